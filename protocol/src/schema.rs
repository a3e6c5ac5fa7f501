//! JSON Schema for the payloads other systems code against.
//!
//! The files in `protocol/schema/` are generated from these types; a test
//! fails when they drift. Regenerate them with
//! `FERRY_WRITE_SCHEMAS=1 cargo test -p ferry-protocol --test schema_files`.

use crate::envelope::Envelope;
use crate::manifest::Manifest;
use crate::messages::{BlockRequest, Desired, Event, Health, Reported, Status};

/// Each published schema: its file name and its JSON text (pretty, with a
/// final newline).
pub fn published() -> Vec<(&'static str, String)> {
    fn render(schema: schemars::Schema) -> String {
        let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
        text.push('\n');
        text
    }
    vec![
        ("health.schema.json", render(schemars::schema_for!(Health))),
        ("event.schema.json", render(schemars::schema_for!(Event))),
        (
            "reported.schema.json",
            render(schemars::schema_for!(Reported)),
        ),
        ("status.schema.json", render(schemars::schema_for!(Status))),
        (
            "desired.schema.json",
            render(schemars::schema_for!(Desired)),
        ),
        (
            "block-request.schema.json",
            render(schemars::schema_for!(BlockRequest)),
        ),
        (
            "manifest.schema.json",
            render(schemars::schema_for!(Manifest)),
        ),
        (
            "envelope.schema.json",
            render(schemars::schema_for!(Envelope)),
        ),
    ]
}
