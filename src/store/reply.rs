//! Reading what Redis answers: typed lists, and the array replies of the scripts.
//!
//! Owns [`Committed`] (an outbox member as a transition to publish) and the readers every
//! operation shares. Must not know what a particular script's fields mean: each operation
//! names its own (see `expire.rs`, `forget.rs`).

use redis::Value;

use super::error::StoreError;
use crate::bucket::Bucket;
use crate::status::Outbound;

/// A transition committed in Redis (by this caller), waiting to be published.
#[derive(Clone, Debug)]
pub struct Committed {
    pub bucket: Bucket,
    /// The outbox member: removing it records the broker's acknowledgement.
    pub member: String,
    pub event: Outbound,
}

impl Committed {
    /// The transition an outbox member of bucket `b` stands for.
    pub(crate) fn from_member(b: Bucket, member: String) -> Result<Committed, StoreError> {
        let event = Outbound::parse_member(&member)
            .ok_or_else(|| StoreError::Protocol(format!("malformed outbox member {member:?}")))?;
        Ok(Committed {
            bucket: b,
            member,
            event,
        })
    }
}

/// Converts replies to a typed list.
pub(crate) fn decode<T: redis::FromRedisValue>(values: Vec<Value>) -> Result<Vec<T>, StoreError> {
    values
        .into_iter()
        .map(|v| Ok(redis::from_redis_value(v)?))
        .collect()
}

/// A reply that is a list of outbox members (`nil` for none).
pub(crate) fn members(b: Bucket, reply: Value) -> Result<Vec<Committed>, StoreError> {
    match reply {
        Value::Array(items) => committed_all(b, &items),
        Value::Nil => Ok(Vec::new()),
        other => Err(StoreError::Protocol(format!(
            "expected an array, got {other:?}"
        ))),
    }
}

/// A scalar reply as text (integers included).
pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn committed_all(b: Bucket, items: &[Value]) -> Result<Vec<Committed>, StoreError> {
    items
        .iter()
        .map(|v| {
            let member = text(v)
                .ok_or_else(|| StoreError::Protocol(format!("expected a string, got {v:?}")))?;
            Committed::from_member(b, member)
        })
        .collect()
}

/// The fields of a script's array reply, read in order: a few scalars, then outbox members.
/// A missing or unreadable scalar reads as empty text.
pub(crate) struct Fields<'a> {
    items: std::slice::Iter<'a, Value>,
}

impl<'a> Fields<'a> {
    /// The fields of `reply`, which must be an array (`script` names it in the error).
    pub(crate) fn of(reply: &'a Value, script: &str) -> Result<Fields<'a>, StoreError> {
        match reply {
            Value::Array(items) => Ok(Fields {
                items: items.iter(),
            }),
            other => Err(StoreError::Protocol(format!(
                "expected an array from the {script} script, got {other:?}"
            ))),
        }
    }

    /// The next field as text.
    pub(crate) fn text(&mut self) -> String {
        self.items.next().and_then(text).unwrap_or_default()
    }

    /// The next field as text, `None` at the end.
    pub(crate) fn next_text(&mut self) -> Option<String> {
        self.items.next().map(|v| text(v).unwrap_or_default())
    }

    /// The next field as a flag (`1` is set).
    pub(crate) fn flag(&mut self) -> bool {
        self.text() == "1"
    }

    /// The remaining fields, as outbox members of bucket `b`.
    pub(crate) fn members(self, b: Bucket) -> Result<Vec<Committed>, StoreError> {
        committed_all(b, self.items.as_slice())
    }
}
