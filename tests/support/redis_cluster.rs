//! A real Redis Cluster of `redis-server` processes.

use std::process::Command;

use super::*;

/// A real Redis Cluster on loopback: `masters` masters with one replica each, made by
/// `redis-cli --cluster create`. Failover is quick (node timeout 1.5 s) and always allowed
/// (`cluster-replica-validity-factor 0`), as a test of failover needs.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(masters: usize) -> RedisCluster {
        Self::start_with(masters, 1).await
    }

    /// `masters` masters with `replicas` replicas each.
    pub async fn start_with(masters: usize, replicas: usize) -> RedisCluster {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1500",
            "--cluster-replica-validity-factor",
            "0",
            "--cluster-require-full-coverage",
            "no",
        ];
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| RedisServer::start_with(&args))
            .collect();
        let out = Command::new(binary("redis-cli", "REDIS_CLI_BIN"))
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_healthy(masters).await;
        cluster
    }

    /// Waits until every live node sees the cluster ok, with `masters` masters serving slots
    /// and every replica in sync.
    pub async fn wait_healthy(&self, masters: usize) {
        eventually("a healthy Redis Cluster", || async {
            for n in self.nodes.iter().filter(|n| n.is_running()) {
                let mut c = n.try_conn().await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .ok()?;
                if !info.contains("cluster_state:ok") {
                    return None;
                }
                let repl: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut c)
                    .await
                    .ok()?;
                if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                    return None;
                }
            }
            (self.masters().await.len() == masters).then_some(())
        })
        .await;
    }

    /// Seed URLs for `redis.cluster_nodes` (two nodes: either may be the one that is down).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .take(2)
            .map(|n| n.url().replace("/0", ""))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `CLUSTER NODES` as a live node sees it.
    pub async fn topology(&self) -> Vec<presenced::cluster::Node> {
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            if let Some(mut c) = n.try_conn().await {
                if let Ok(text) = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut c)
                    .await
                {
                    return presenced::cluster::parse_nodes(&text);
                }
            }
        }
        panic!("no cluster node answers");
    }

    /// The masters serving slots (not failed), as indexes into `nodes` with their slots.
    pub async fn masters(&self) -> Vec<(usize, Vec<(u16, u16)>)> {
        self.topology()
            .await
            .into_iter()
            .filter(|n| n.serves_slots() && !n.failing)
            .filter_map(|n| {
                let i = self.nodes.iter().position(|s| s.port == n.port)?;
                Some((i, n.slots))
            })
            .collect()
    }

    /// The index of the node serving `slot`.
    pub async fn owner(&self, slot: u16) -> usize {
        self.masters()
            .await
            .into_iter()
            .find(|(_, slots)| slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|(i, _)| i)
            .expect("a master serves every slot")
    }
}
