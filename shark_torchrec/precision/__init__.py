"""Row precision math: quantization, stochastic rounding, priority scores, budgets.

Pure functions on tensors: no modules, no process groups. The row-group store
(`shark_torchrec.modules.row_groups`) and the sharded modules call into them.
"""
