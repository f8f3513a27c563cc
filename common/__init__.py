"""The bottom floor: what every package may import and which imports none of them.

- errors.py: UserError, the one base class of problems a user can fix, and the error kinds shared across packages.
- files.py: atomic writes (temporary name, then rename) of files and folders; no torch.
- safetensors_file.py: safetensors files written byte for byte the same for the same tensors.
"""
