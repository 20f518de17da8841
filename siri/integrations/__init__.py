"""siri.kernels inside other trainers.

`siri.integrations.trl` (TRL's GRPOTrainer) and `siri.integrations.verl` (verl's actor
loss) are imported on demand: each needs its peer package installed (extras `trl`,
`verl`), and importing this package imports neither.
"""
