"""One module per checkpoint file format; models/checkpoint.py detects the format and dispatches.

- official.py: the PixArt repositories' .pth (plus this project's NAME.yaml config beside it).
- diffusers.py: diffusers' transformer folder, the official <-> diffusers key map and config.json.
- safetensors.py: this project's safetensors file with the config in its metadata.
"""
