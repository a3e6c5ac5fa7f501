//! Values that travel as one JSON string: written with `Display`, read back
//! with `FromStr` (so reading runs the same checks as parsing), and described
//! in JSON Schema as a string.

/// Implements serde and (with feature `schema`) `JsonSchema` for `$ty` as a
/// string, with `$schema` as its JSON Schema.
macro_rules! string_type {
    ($ty:ident, $schema:tt) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        crate::text::string_schema!($ty, $schema);
    };
}

/// Implements `JsonSchema` (with feature `schema`) for `$ty` as `$schema`.
macro_rules! string_schema {
    ($ty:ident, $schema:tt) => {
        #[cfg(feature = "schema")]
        impl schemars::JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!($schema)
            }
        }
    };
}

pub(crate) use {string_schema, string_type};
