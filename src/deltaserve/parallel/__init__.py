"""Tensor and expert parallelism over torch.distributed (docs/PARALLEL.md).

    sharding.py  which part of each checkpoint tensor a rank keeps (modules' `tp_shards`), read without the rest
    group.py     the process groups, the model's collectives (bounded timeouts) and rank 0's command broadcast
    layers.py    vocab-parallel embedding / lm_head, expert-parallel experts, the decoder layers' all-reduce
    runner.py    the per-rank model runner, rank 0's driver and the worker loop
    launch.py    spawning one worker process per rank, or joining a torchrun-style launch (env variables)

Nothing here is imported at tensor-parallel size 1 except the helpers the layers call at construction, which
return None there.
"""
