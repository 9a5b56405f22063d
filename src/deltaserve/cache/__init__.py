"""Cache memory: page and slot allocators (allocator.py), the cache manager that decides who holds what
(manager.py, the scheduler's one view of memory), the memory planner (planner.py) and the device tensors
(tensors.py). Everything but tensors.py is pure Python."""
