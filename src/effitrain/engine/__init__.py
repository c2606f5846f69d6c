"""The engine: what a worker runs. job.py starts the process's Job (world, degrees, mesh: once); train.py builds
every part from a composed config into a TrainState (state.py) and runs the loop (loop.py); around it process-wide
settings (runtime.py), the profiler (profiling.py), the CPU heap policy (hostmem.py), a step's measured peak
(memprobe.py) and the shipped model (export.py: checkpoint -> Hugging Face directory, sample). It stands on the
groups and on base/."""
