//! What a store call can fail with.
//!
//! Owns [`StoreError`]. Must not decide what a caller does about a failure (retry, wait for
//! the rebuild): that is the caller's.

use redis::{ParsingError, RedisError};

use crate::bucket::Bucket;
use crate::cluster::DiscoverError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    /// A reply of another type than the command's.
    #[error("unexpected reply from redis: {0}")]
    Decode(#[from] ParsingError),
    /// The bucket's epoch key is gone: Redis lost its data; it waits for the rebuild.
    #[error("redis lost the data of bucket {0}; waiting for the rebuild")]
    Lost(Bucket),
    /// No node told the cluster's topology.
    #[error("reading the cluster topology: {0}")]
    Topology(#[from] DiscoverError),
}
