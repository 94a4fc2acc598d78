"""The experiment binaries, the libraries they call and the named configs.

Binaries (absl or argparse; each parses its command line and calls a
`*_lib` function). The first five install with the package as console
commands (setup.cfg's entry points); every one also runs from a checkout as
`python -m tf_dpfair.experiments.<name>`:

- `train` (`tf-dpfair-train`): one run, `train_lib.run`.
- `sweep` (`tf-dpfair-sweep`): a grid of runs, `sweep_lib.run_sweep`.
- `report` (`tf-dpfair-report`): a sweep's tables and figures,
  `report_lib.write_sweep_report`.
- `demo` (`tf-dpfair-demo`, what `make demo` runs): `demo_lib.run_demo`.
- `mechanism` (`tf-dpfair-mechanism`): per-group clipping and gradients
  against the accuracy gap, `mechanism_lib.run_study`.
- `pretrained_vs_scratch`: DP fine-tuning of ImageNet-pretrained
  EfficientNet-Lite0 against the same net from scratch.
- `render_dashboard`: regenerates docs/dashboard.png (needs Chromium and a
  checkout to write into).

Libraries: the `*_lib` modules; `configs/` holds the named settings that
`--config=NAME` loads (`configs.load`). A module here is a binary exactly
when its name does not end in `_lib` (tools/gen_build.py makes those
`py_binary` targets, and the tests tell them apart the same way).

Importing a binary defines its absl flags in the process-wide registry, and
several binaries define flags of the same name (`--config`, `--work_dir`),
so nothing imports a binary but its own tests; library code imports only the
`*_lib` modules and `configs`. Importing this package imports nothing.
"""
