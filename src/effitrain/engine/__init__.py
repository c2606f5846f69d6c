"""The engine: what a worker runs. train.py builds every part from a composed config into a TrainState (state.py)
and runs the loop (loop.py); around it the process group (distributed.py), process-wide settings (runtime.py),
model transforms (converters.py), FLOPs and peaks (flops.py), the profiler (profiling.py), the CPU heap policy
(hostmem.py), and the shipped model (export.py: checkpoint -> Hugging Face directory, sample)."""
