"""A strict stand-in for TensorFlow Serving on Neuron (``tensorflow_model_server_neuronx``), for tests only.

The real server cannot run without Neuron hardware, so end-to-end tests run serving pods on this stand-in. It
parses the real command line, loads the newest numbered version under ``--model_base_path`` as the real server
does, and refuses what the Neuron runtime would refuse (no visible NeuronCore, NeuronOps not tagged
``_automatic_multicore`` for exactly the visible cores, pipelined NeuronOps, no NeuronOp at all). Then it runs
the model for real on CPU (NeuronOps inlined back by ``neuron_modelgen.deneuronized_copy``) behind the REST API
and the gRPC API (Predict, GetModelMetadata, GetModelStatus, with TF Serving's own service definitions).

Not implemented (refused with an explicit error where a flag or a call asks for it): ``--model_config_file``,
``--platform_config_file``, SSL/ALTS credentials, UNIX sockets, the gRPC health check and profiler services,
``:classify``/``:regress`` and the Classify, Regress, MultiInference and HandleReloadConfigRequest RPCs, request
batching (the parameters file is validated, batching itself is not done), model warmup.
"""
