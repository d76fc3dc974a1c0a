"""TensorRT target: plugins from the op specs (:mod:`.plugin`), engine build (:mod:`.build`)."""
