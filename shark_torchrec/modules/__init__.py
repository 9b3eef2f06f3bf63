"""Unsharded modules and their configs (TorchRec's `torchrec/modules` counterpart)."""
