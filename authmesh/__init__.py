"""authmesh: the command-line front door, and (under auth/ and resource/) the generated gRPC code."""
