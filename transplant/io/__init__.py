"""I/O layer: streaming safetensors (`safetensors`), model-dir surgery (`surgery`) and the one atomic
output-directory helper (`atomic`) every writer uses."""
