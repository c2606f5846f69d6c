"""The first module the CPU workers' forkserver imports (launch.py's preload list): it installs the import-noise
log filters before the preloaded torch/transformers/torchao imports print what the CLI process already hides."""

from effitrain.logging import quiet_import_noise

quiet_import_noise()
