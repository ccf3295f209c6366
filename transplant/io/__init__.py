"""I/O layer: streaming, validated safetensors (`safetensors`), config files (`model_config`), model-dir
surgery (`surgery`), the one atomic output-directory helper every writer uses (`atomic`) and the memory check
solvers call before allocating (`memory`)."""
