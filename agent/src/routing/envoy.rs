//! Envoy resources (from xDS) into the routing model.
