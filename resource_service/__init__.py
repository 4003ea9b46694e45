"""The reference resource service: a protected gRPC API that verifies every call locally."""
