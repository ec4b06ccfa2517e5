"""Export of trained runs to ONNX: the torch side of laser-batch (the CLI's `export`; `score` never imports it).

Modules, each importing only those after it: `export` (the run -> artefact directory), `quantize` (quantised
user-encoder variants) with `gate` (their quality gate on held-out truth) and `smooth` (SmoothQuant), `manifest`,
`parts` (the exportable parts and their Optimum configs), `validate` (tolerances and the checks against torch).
"""
