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

/// The README's configuration table names every key the code knows, and no other.
#[test]
fn readme_configuration_table_matches_the_keys() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let section = readme
        .split("### Configuration")
        .nth(1)
        .unwrap()
        .split("\n### ")
        .next()
        .unwrap();
    for key in presenced::config::KEYS {
        assert!(
            section.contains(&format!("`{}`", key.path())),
            "README's configuration table lacks {}",
            key.path()
        );
    }
    for cell in section.lines().filter(|l| l.starts_with("| `")) {
        for name in cell.split('|').nth(1).unwrap().split(',') {
            let name = name.trim().trim_matches('`');
            assert!(
                presenced::config::KEYS.iter().any(|k| k.path() == name),
                "README documents {name}, which is no configuration key"
            );
        }
    }
}
