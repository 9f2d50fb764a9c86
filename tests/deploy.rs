//! Static checks of what `deploy/` ships.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use presenced::config::{example_toml, Config, Sources};

const EXAMPLE: &str = "deploy/presenced.example.toml";

/// The example config documents every key with its default, is generated from the code
/// (so it cannot drift; `UPDATE_EXAMPLE=1 cargo test --test deploy` rewrites it), and loads.
#[test]
fn example_config_is_current_and_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(EXAMPLE);
    let generated = example_toml();
    if std::env::var_os("UPDATE_EXAMPLE").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        shipped, generated,
        "{EXAMPLE} is stale: run UPDATE_EXAMPLE=1 cargo test --test deploy"
    );
    Config::load(&Sources {
        file: Some(path),
        ..Sources::default()
    })
    .unwrap();
}
