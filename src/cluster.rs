//! Redis Cluster topology, for what the cluster client does not do for us: keyspace
//! notifications are local to each node, so the listener needs every node's address and
//! role (see `expiry`), and a probe key must be aimed at a slot of a given master.
//!
//! Commands are routed by redis-rs's cluster client (`store`); this module only reads
//! `CLUSTER NODES`, which every Redis Cluster (managed ones included) answers. Must not
//! route commands: redis-rs does.

use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, RedisError};

/// Number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: u16 = 16_384;

/// One node as `CLUSTER NODES` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub host: String,
    pub port: u16,
    pub master: bool,
    /// Flagged `fail` (agreed down by the cluster) or `fail?` (suspected by the node asked).
    pub failing: bool,
    /// Inclusive slot ranges this node serves (masters only).
    pub slots: Vec<(u16, u16)>,
}

impl Node {
    /// `host:port`, the node's identity for the listener.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A master that serves slots: its `expired` events are part of the fleet's.
    pub fn serves_slots(&self) -> bool {
        self.master && !self.slots.is_empty()
    }
}

/// Parses the reply of `CLUSTER NODES`. Nodes without an address (`noaddr`) or still in
/// the handshake are left out; migrating/importing markers (`[slot->-id]`) are ignored.
pub fn parse_nodes(text: &str) -> Vec<Node> {
    text.lines().filter_map(parse_node).collect()
}

/// One line of `CLUSTER NODES`:
/// `id ip:port@cport[,hostname] flags master ping pong epoch link slot...`.
fn parse_node(line: &str) -> Option<Node> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return None;
    }
    let flags: Vec<&str> = fields[2].split(',').collect();
    if flags.iter().any(|f| matches!(*f, "noaddr" | "handshake")) {
        return None;
    }
    let (host, port) = parse_address(fields[1])?;
    Some(Node {
        id: fields[0].to_owned(),
        host,
        port,
        master: flags.contains(&"master"),
        failing: flags.iter().any(|f| f.starts_with("fail")),
        slots: fields[8..].iter().filter_map(|s| parse_slots(s)).collect(),
    })
}

/// `ip:port@cport[,hostname]` as the host to connect to (the hostname when announced) and
/// the port; `None` without a usable address.
fn parse_address(field: &str) -> Option<(String, u16)> {
    let (addr, hostname) = match field.split_once(',') {
        Some((a, h)) => (a, Some(h)),
        None => (field, None),
    };
    let addr = addr.split('@').next().unwrap_or(addr);
    let (ip, port) = addr.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    if ip.is_empty() || port == 0 {
        return None;
    }
    let host = hostname
        .filter(|h| !h.is_empty())
        .unwrap_or(ip)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Some((host, port))
}

/// A slot range (`a-b`) or a single slot; `None` for a migration marker (`[...]`).
fn parse_slots(field: &str) -> Option<(u16, u16)> {
    if field.starts_with('[') {
        return None;
    }
    match field.split_once('-') {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => field.parse().ok().map(|n| (n, n)),
    }
}

/// The hash slot of a key (CRC16/XMODEM of the key, or of its first non-empty `{tag}`).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&c| c == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A hash tag (without braces) whose slot lies in one of `slots`, for a key that must live
/// on a given master (the notification probe).
pub(crate) fn tag_in(slots: &[(u16, u16)]) -> Option<String> {
    (0u32..1_000_000).map(|n| format!("p{n}")).find(|tag| {
        let slot = key_slot(tag.as_bytes());
        slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    })
}

/// The connection settings of a node: those of a seed (credentials, TLS) at the node's
/// address.
pub(crate) fn node_info(seed: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match seed.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    seed.clone().set_addr(addr)
}

/// Why no node told the topology: the last candidate's failure.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("no node to ask")]
    NoCandidate,
    #[error("{addr}: {source}")]
    Node {
        addr: String,
        #[source]
        source: AskError,
    },
}

/// Why one node did not tell the topology.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("timed out")]
    TimedOut,
    #[error("CLUSTER NODES listed no node")]
    Empty,
}

/// Asks the first node that answers among `candidates` for the topology.
pub(crate) async fn discover(candidates: &[ConnectionInfo]) -> Result<Vec<Node>, DiscoverError> {
    let mut last = DiscoverError::NoCandidate;
    for info in candidates {
        match ask(info).await {
            Ok(nodes) => return Ok(nodes),
            Err(source) => {
                last = DiscoverError::Node {
                    addr: info.addr().to_string(),
                    source,
                }
            }
        }
    }
    Err(last)
}

/// The topology as one node tells it (an empty one is an error: a node lists itself).
async fn ask(info: &ConnectionInfo) -> Result<Vec<Node>, AskError> {
    let client = redis::Client::open(info.clone())?;
    let text: String = tokio::time::timeout(Duration::from_secs(2), async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(&mut conn)
            .await
    })
    .await
    .map_err(|_| AskError::TimedOut)??;
    let nodes = parse_nodes(&text);
    if nodes.is_empty() {
        return Err(AskError::Empty);
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"presence:{7}:rec"), key_slot(b"7"));
        // An empty tag hashes the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
    }

    #[test]
    fn tags_land_in_the_asked_slots() {
        let tag = tag_in(&[(100, 120)]).unwrap();
        assert!((100..=120).contains(&key_slot(tag.as_bytes())));
        assert_eq!(tag_in(&[]), None);
    }

    #[test]
    fn cluster_nodes_are_parsed() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,node-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master,fail - 1426238316232 0 3 disconnected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 10923 [10924->-292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f]
6ec23923021cf3ffec47632106199cb7f496ce01 :0@0 slave,noaddr 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238316232 5 disconnected
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].host, "node-4");
        assert!(!nodes[0].master);
        assert_eq!(nodes[1].slots, vec![(5461, 10922)]);
        assert!(nodes[1].serves_slots() && !nodes[1].failing);
        assert!(nodes[2].master && nodes[2].failing && !nodes[2].serves_slots());
        assert_eq!(nodes[3].slots, vec![(0, 5460), (10923, 10923)]);
        assert_eq!(nodes[3].addr(), "127.0.0.1:30001");
    }

    #[test]
    fn node_info_keeps_the_seed_settings() {
        let seed = redis::Client::open("rediss://:secret@seed:6379/0")
            .unwrap()
            .get_connection_info()
            .clone();
        let info = node_info(&seed, "10.0.0.2", 7001);
        assert!(
            matches!(info.addr(), ConnectionAddr::TcpTls { host, port: 7001, .. } if host == "10.0.0.2")
        );
        assert_eq!(info.redis_settings().password(), Some("secret"));
    }
}
