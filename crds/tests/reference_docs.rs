//! The committed reference (`docs/reference/*.md`) is what the schemas say: this test fails
//! when a doc comment or a field changed and `make docs` was not run.
//! `PARLEY_UPDATE_DOCS=1` writes the files instead (that is what `make docs` does).

use std::path::PathBuf;

#[test]
fn committed_reference_docs_match_the_schemas() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let update = std::env::var_os("PARLEY_UPDATE_DOCS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (path, generated) in [
        ("docs/reference/crds.md", parley_crds::docs::crds_markdown()),
        (
            "docs/reference/gateway-config.md",
            parley_crds::docs::gateway_config_markdown(),
        ),
    ] {
        let file = repo.join(path);
        if update {
            if let Err(e) = std::fs::write(&file, &generated) {
                stale.push(format!("{path}: cannot write: {e}"));
            }
            continue;
        }
        let committed = std::fs::read_to_string(&file).unwrap_or_default();
        if committed != generated {
            stale.push(format!(
                "{path} is out of date with the schemas: run `make docs` and commit the result"
            ));
        }
    }
    assert!(stale.is_empty(), "{}", stale.join("\n"));
}
