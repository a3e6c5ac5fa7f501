//! The published JSON Schema files must match the Rust types they come from.
//! Set FERRY_WRITE_SCHEMAS=1 to regenerate them after changing a payload.

use std::path::PathBuf;

#[test]
fn schema_files_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema");
    let write = std::env::var_os("FERRY_WRITE_SCHEMAS").is_some();
    let mut stale = Vec::new();
    for (name, text) in ferry_protocol::schema::published() {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == text => {}
            _ => stale.push(name),
        }
    }
    assert!(
        stale.is_empty(),
        "schema files out of date: {stale:?}; run FERRY_WRITE_SCHEMAS=1 cargo test -p ferry-protocol --test schema_files and commit the result"
    );
}

#[test]
fn health_schema_describes_the_fields_monitoring_reads() {
    let (_, text) = ferry_protocol::schema::published()
        .into_iter()
        .find(|(name, _)| *name == "health.schema.json")
        .unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    let required = schema["required"].as_array().unwrap();
    for field in ["schema", "time", "cpu", "memory", "disk", "services"] {
        assert!(required.iter().any(|r| r == field), "{field} not required");
    }
    assert_eq!(schema["properties"]["time"]["$ref"], "#/$defs/Timestamp");
    assert_eq!(schema["$defs"]["Timestamp"]["format"], "date-time");
}
