"""I/O layer: streaming, validated safetensors (`safetensors`), config files (`model_config`), model-dir
surgery (`surgery`), the config fields holding token ids (`token_ids`), every other per-token tensor such as a
decoder bias (`vocab_tensors`), a chat output's stop tokens (`chat_config`), GGUF export for llama.cpp
(`gguf_export`, with the tokenizer as GGUF metadata in `gguf_vocab`, provenance in `gguf_meta` and the
per-architecture keys and tensor layouts in `gguf_arches`),
uploading a finished output to the Hub (`publish`), the one atomic output-directory helper
every writer uses (`atomic`, with its ownership marker in `marker`), the folder a training run may claim
(`claim`) and the memory check solvers call before allocating (`memory`)."""
