//! A copy of the control plane on local disk: a process that starts while
//! the control plane is down (a supervisor restarting a killed cell, say)
//! starts from the last view a process of this data dir saw, so an outage
//! of the control plane stops no payment, restarts included.
//!
//! What is kept is what a process acts on: the shard map, the cells'
//! addresses and states, the operator's switches and flow rules, and how
//! many routers were live (each enforces its share of the cluster-wide
//! limits). Report times are not kept: a saved view says nothing of who is
//! alive now.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use cellpay_core::{CellId, ShardMap};
use serde::{Deserialize, Serialize};

use crate::{CellEntry, ControlError, ControlView, RouterEntry};

const SAVED_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, PartialEq)]
struct Saved {
    version: u32,
    epoch: u64,
    owners: Vec<u32>,
    cells: Vec<SavedCell>,
    live_routers: usize,
    switches: Vec<(String, String)>,
    rules_json: Option<String>,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct SavedCell {
    id: u32,
    address: Option<String>,
    zone: String,
    state: String,
}

impl ControlView {
    /// The view as saved on disk (JSON); equal views give equal text.
    pub fn to_saved(&self) -> String {
        let saved = Saved {
            version: SAVED_VERSION,
            epoch: self.map.epoch(),
            owners: self.map.owners().iter().map(|c| c.0).collect(),
            cells: self
                .cells
                .iter()
                .map(|c| SavedCell {
                    id: c.id.0,
                    address: c.address.clone(),
                    zone: c.zone.clone(),
                    state: c.state.clone(),
                })
                .collect(),
            live_routers: self.live_routers(),
            switches: self.switches.clone(),
            rules_json: self.rules_json.clone(),
        };
        serde_json::to_string_pretty(&saved).expect("a saved view serialises")
    }

    /// A view read back from [`ControlView::to_saved`]'s text.
    pub fn from_saved(text: &str) -> Result<ControlView, ControlError> {
        let damaged = |why: String| ControlError::Damaged(format!("the saved copy of the control plane: {why}"));
        let saved: Saved = serde_json::from_str(text).map_err(|e| damaged(e.to_string()))?;
        if saved.version != SAVED_VERSION {
            return Err(damaged(format!("version {} is not {SAVED_VERSION}", saved.version)));
        }
        let map = ShardMap::new(saved.epoch, saved.owners.into_iter().map(CellId).collect())
            .map_err(|e| damaged(e.to_string()))?;
        let cells: Vec<CellEntry> = saved
            .cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if c.id as usize != i {
                    return Err(damaged(format!("cell {} listed in place {i}", c.id)));
                }
                Ok(CellEntry {
                    id: CellId(c.id),
                    address: c.address,
                    zone: c.zone,
                    state: c.state,
                    process: None,
                    seen_ms_ago: None,
                })
            })
            .collect::<Result<_, _>>()?;
        if let Some(unknown) = map.owners().iter().find(|o| o.0 as usize >= cells.len()) {
            return Err(damaged(format!("the map names cell {unknown}, which it does not list")));
        }
        // As many routers as were live, so each router's share of the limits stays what it was.
        let routers = (0..saved.live_routers)
            .map(|i| RouterEntry { name: format!("saved-{i}"), address: None, seen_ms_ago: Some(0) })
            .collect();
        Ok(ControlView {
            map,
            cells,
            routers,
            switches: saved.switches,
            rules_json: saved.rules_json,
            read_at: Instant::now(),
        })
    }
}

/// Writes `text` to `path` whole or not at all: a temporary file of this
/// process, synced, then renamed over it.
pub fn save_text(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable once the directory is.
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// The view saved at `path`.
pub fn load_view(path: &Path) -> Result<ControlView, ControlError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ControlError::Damaged(format!("cannot read the saved copy {}: {e}", path.display())))?;
    ControlView::from_saved(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> ControlView {
        ControlView {
            map: ShardMap::new(7, vec![CellId(0), CellId(1), CellId(1), CellId(0)]).unwrap(),
            cells: (0..2)
                .map(|i| CellEntry {
                    id: CellId(i),
                    address: Some(format!("127.0.0.1:{}", 9000 + i)),
                    zone: "local".into(),
                    state: "active".into(),
                    process: Some("1@host".into()),
                    seen_ms_ago: Some(10),
                })
                .collect(),
            routers: vec![
                RouterEntry { name: "r0".into(), address: None, seen_ms_ago: Some(100) },
                RouterEntry { name: "r1".into(), address: None, seen_ms_ago: Some(200) },
                RouterEntry { name: "gone".into(), address: None, seen_ms_ago: None },
            ],
            switches: vec![("cross_cell_defer".into(), "on".into())],
            rules_json: Some("{}".into()),
            read_at: Instant::now(),
        }
    }

    #[test]
    fn a_saved_view_reads_back_as_what_a_process_acts_on() {
        let dir = std::env::temp_dir().join(format!("cellpay-saved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control-view.json");
        let v = view();
        save_text(&path, &v.to_saved()).unwrap();
        let back = load_view(&path).unwrap();
        assert_eq!(back.map, v.map);
        assert_eq!(
            back.cells.iter().map(|c| c.address.clone()).collect::<Vec<_>>(),
            vec![Some("127.0.0.1:9000".to_string()), Some("127.0.0.1:9001".to_string())]
        );
        assert_eq!(back.live_routers(), 2, "the live routers' count, so each keeps its share");
        assert_eq!((back.switches.clone(), back.rules_json.clone()), (v.switches.clone(), v.rules_json.clone()));
        assert_eq!(back.to_saved(), v.to_saved());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_saved_view_is_refused_not_half_read() {
        let text = view().to_saved();
        for bad in [
            text.replace("\"epoch\": 7", "\"epoch\": -1"),
            text.replace("\"cells\": [", "\"cells\": [], \"dropped\": ["),
            text.replace("\"version\": 1", "\"version\": 2"),
            text.replace("\"id\": 1", "\"id\": 5"),
            text[..text.len() / 2].to_string(),
        ] {
            assert!(matches!(ControlView::from_saved(&bad), Err(ControlError::Damaged(_))), "{bad}");
        }
    }
}
