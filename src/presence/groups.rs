//! Group outages, noted from acknowledged statuses: before the outbox records a batch of
//! the broker's acknowledgements, every device status of a group in it is noted in its group
//! (src/lua/note.lua decides the openings and closings), and what that staged is handed to
//! the publisher. Noting before acknowledging means a transition is noted even if the replica
//! that committed it dies: whoever claims and publishes it notes it. Decides nothing itself.

use std::collections::HashSet;

use tokio::sync::mpsc;
use tracing::info;

use super::handoff::publish;
use crate::device::GroupName;
use crate::group_status::GroupState;
use crate::metrics::Metrics;
use crate::status::{Delivered, Lag, Outbound, StatusOut};
use crate::store::{Note, NoteMode, Noted, OutageRule, Store, StoreError};

/// What the outbox needs to note groups.
pub(crate) struct GroupNotes {
    pub(crate) rule: OutageRule,
    pub(crate) metrics: Metrics,
}

/// The notes an acknowledged status makes: in its group, if it is a device status of one,
/// and in the group it left, if it came back online in another.
fn notes_of(ack: &Delivered) -> Vec<Note> {
    let Some(Outbound::Device(ev)) = Outbound::parse_member(&ack.receipt.member) else {
        return Vec::new();
    };
    let noted = if ev.is_clear() {
        Noted::Forgotten
    } else {
        Noted::Went(ev.state)
    };
    let note = |group: &GroupName, noted| Note {
        group: group.clone(),
        noted,
        seq: ev.seq,
        since: ev.since,
        device: ev.device.clone(),
    };
    let here = ev.group.iter().map(|g| note(g, noted));
    let left = ev.left.iter().map(|g| note(g, Noted::Left));
    here.chain(left).collect()
}

impl GroupNotes {
    /// Whether an acknowledged status is noted in a group (it waits for its note).
    pub(crate) fn notes(ack: &Delivered) -> bool {
        !notes_of(ack).is_empty()
    }

    /// Notes the group statuses among `acks`; hands on the outage statuses staged. An error
    /// (a bucket that failed) means the acknowledgements must wait: what did get staged is
    /// handed on all the same.
    pub(crate) async fn note(
        &self,
        store: &Store,
        out: &mpsc::Sender<StatusOut>,
        acks: &[Delivered],
    ) -> Result<(), StoreError> {
        let notes: Vec<Note> = acks.iter().flat_map(notes_of).collect();
        if notes.is_empty() {
            return Ok(());
        }
        let groups: Vec<GroupName> = notes
            .iter()
            .map(|n| n.group.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let totals = store.group_totals(&groups).await?;
        let mut staged = store
            .note(&notes, &totals, &self.rule, NoteMode::Decide)
            .await;
        for status in staged.done.iter().filter_map(|c| match &c.event {
            Outbound::Group(g) => Some(g),
            Outbound::Device(_) => None,
        }) {
            if status.state == GroupState::Outage {
                self.metrics.outage_opened();
            }
            info!(group = %status.group, state = status.state.as_str(), seq = status.seq,
                affected = status.affected, recovered = status.recovered, "Group outage.");
        }
        publish(out, std::mem::take(&mut staged.done), Lag::Skip).await;
        staged.into_result().map(|_| ())
    }
}
