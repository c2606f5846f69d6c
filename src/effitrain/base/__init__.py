"""The floor the config groups and the engine both stand on: the ModelConverter protocol a precision or compression
option implements (converters.py), the process group and its few collectives (distributed.py), and model FLOPs per
token and device peaks (flops.py). Nothing here imports a group, the engine or a verb."""
