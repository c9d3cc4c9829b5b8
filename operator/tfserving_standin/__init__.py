"""A strict stand-in for TensorFlow Serving on Neuron (``tensorflow_model_server_neuronx``), for tests only.

The real server cannot run without Neuron hardware, so end-to-end tests run serving pods on this stand-in. It
parses the real command line, loads the newest numbered version under ``--model_base_path`` as the real server
does, and refuses what the Neuron runtime would refuse (no visible NeuronCore, NeuronOps not tagged
``_automatic_multicore`` for exactly the visible cores, pipelined NeuronOps, no NeuronOp at all). Then it runs
the model for real on CPU (NeuronOps inlined back by ``neuron_modelgen.deneuronized_copy``) behind the REST API.

Not implemented (refused with an explicit error where a flag asks for it): the gRPC API (the gRPC port only
accepts TCP connections, enough for the kubelet's liveness probe), ``--model_config_file``,
``--platform_config_file``, SSL/ALTS credentials, UNIX sockets, ``:classify``/``:regress``, request batching (the
parameters file is validated, batching itself is not done), model warmup.
"""
