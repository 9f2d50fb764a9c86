//! The Lua scripts (`src/lua/`, each prefixed with `common.lua`) and how they are loaded.
//!
//! Owns [`Scripts`]: the sources, their SHA1s, the EVALSHA command of a call, and SCRIPT
//! LOAD on one Redis or every master of a cluster. Must not build a script's arguments or
//! read its reply: each operation does its own.

use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

use super::connection::Conn;

const COMMON_LUA: &str = include_str!("../lua/common.lua");

/// A Lua script with its SHA1, invoked with EVALSHA inside pipelines.
pub(crate) struct LuaScript {
    source: String,
    sha: String,
}

impl LuaScript {
    fn new(body: &str) -> LuaScript {
        let source = format!("{COMMON_LUA}\n{body}");
        let sha = redis::Script::new(&source).get_hash().to_owned();
        LuaScript { source, sha }
    }

    /// The EVALSHA call of this script.
    pub(crate) fn cmd(&self, keys: &[String], args: Vec<String>) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys.len()).arg(keys).arg(args);
        cmd
    }

    fn load(&self) -> Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(&self.source);
        cmd
    }
}

/// Every script of the store.
pub(crate) struct Scripts {
    pub(crate) heartbeat: LuaScript,
    pub(crate) expire: LuaScript,
    pub(crate) ack: LuaScript,
    pub(crate) claim: LuaScript,
    pub(crate) clock: LuaScript,
    pub(crate) forget: LuaScript,
    pub(crate) offsince: LuaScript,
    pub(crate) import: LuaScript,
    pub(crate) republish: LuaScript,
    pub(crate) note: LuaScript,
    pub(crate) import_groups: LuaScript,
    pub(crate) will: LuaScript,
    pub(crate) events_read: LuaScript,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        Scripts {
            heartbeat: LuaScript::new(include_str!("../lua/heartbeat.lua")),
            expire: LuaScript::new(include_str!("../lua/expire.lua")),
            ack: LuaScript::new(include_str!("../lua/ack.lua")),
            claim: LuaScript::new(include_str!("../lua/claim.lua")),
            clock: LuaScript::new(include_str!("../lua/clock.lua")),
            forget: LuaScript::new(include_str!("../lua/forget.lua")),
            offsince: LuaScript::new(include_str!("../lua/offsince.lua")),
            import: LuaScript::new(include_str!("../lua/import.lua")),
            republish: LuaScript::new(include_str!("../lua/republish.lua")),
            note: LuaScript::new(include_str!("../lua/note.lua")),
            import_groups: LuaScript::new(include_str!("../lua/import_groups.lua")),
            will: LuaScript::new(include_str!("../lua/will.lua")),
            events_read: LuaScript::new(include_str!("../lua/events_read.lua")),
        }
    }

    fn all(&self) -> [&LuaScript; 13] {
        [
            &self.heartbeat,
            &self.expire,
            &self.ack,
            &self.claim,
            &self.clock,
            &self.forget,
            &self.offsince,
            &self.import,
            &self.republish,
            &self.note,
            &self.import_groups,
            &self.will,
            &self.events_read,
        ]
    }

    /// Loads every script; in a cluster SCRIPT LOAD goes to every master (a promoted
    /// replica starts with an empty script cache: NOSCRIPT brings us back here).
    pub(crate) async fn load(&self, conn: &Conn) -> Result<(), RedisError> {
        if conn.is_cluster() {
            // One command each: a pipeline is routed to a single node.
            for s in self.all() {
                s.load().query_async::<Value>(&mut conn.clone()).await?;
            }
        } else {
            let mut pipe = redis::pipe();
            for s in self.all() {
                pipe.add_command(s.load()).ignore();
            }
            pipe.query_async::<()>(&mut conn.clone()).await?;
        }
        Ok(())
    }
}

/// Whether Redis had forgotten the script (after a restart or a failover): the call did
/// nothing and may be run again once the scripts are loaded.
pub(crate) fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}
