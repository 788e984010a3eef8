"""Suite-wide settings: one torch thread per test process.

The tests use small tensors; on a shared 2-core machine OpenMP's spin-waiting with two threads
made them up to ~100x slower than one thread (measured by the nets and metrics tests).
"""

import torch

torch.set_num_threads(1)
