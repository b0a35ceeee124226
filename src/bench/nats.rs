//! The NATS JetStream side of the benchmark suite (issue 8): being written.
