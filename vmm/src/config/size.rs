//! Sizes as users write them: a number of bytes or text like `512M`, in TOML and on the
//! command line, and back to text for messages (`4M`, not `4194304`).

use faultline_abi as abi;

/// Deserializes a size from a TOML integer (bytes) or a string (`"512M"`), with a message
/// that says both forms instead of serde's "did not match any variant".
pub fn deserialize_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor)
}

/// [`deserialize_size`] for an optional field: `null` (how a serialized config, e.g. in a
/// snapshot, writes "not given") is `None`.
pub fn deserialize_opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(OptSizeVisitor)
}

struct OptSizeVisitor;

impl<'de> serde::de::Visitor<'de> for OptSizeVisitor {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        SizeVisitor.expecting(f)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        deserialize_size(d).map(Some)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        SizeVisitor.visit_u64(v).map(Some)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        SizeVisitor.visit_i64(v).map(Some)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        SizeVisitor.visit_str(v).map(Some)
    }
}

/// A list of sizes (`[ "128M", 0 ]`).
pub fn deserialize_sizes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(serde::Deserialize)]
    struct One(#[serde(deserialize_with = "deserialize_size")] u64);
    let list: Vec<One> = serde::Deserialize::deserialize(d)?;
    Ok(list.into_iter().map(|one| one.0).collect())
}

struct SizeVisitor;

impl serde::de::Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a size: a whole number of bytes (e.g. 536870912) or text like \"512M\" or \"1G\"")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
        abi::parse_size(v)
            .ok_or_else(|| E::custom(format!("cannot parse size '{v}' (use e.g. 512M, 1G, or a number of bytes)")))
    }
}

/// `bytes` as the shortest exact text `parse_size` reads back: `4M`, `1G`, `12K`, `100001`.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Holder {
        #[serde(deserialize_with = "deserialize_size")]
        size: u64,
    }

    #[test]
    fn sizes_read_from_numbers_and_text_and_name_both_forms_when_wrong() {
        assert_eq!(toml::from_str::<Holder>("size = 4096").unwrap().size, 4096);
        assert_eq!(toml::from_str::<Holder>("size = \"64M\"").unwrap().size, 64 << 20);
        let err = toml::from_str::<Holder>("size = true").unwrap_err().to_string();
        assert!(err.contains("a whole number of bytes") && err.contains("\"512M\""), "{err}");
        assert!(!err.contains("untagged"), "{err}");
        let err = toml::from_str::<Holder>("size = -1").unwrap_err().to_string();
        assert!(err.contains("a whole number of bytes"), "{err}");
        let err = toml::from_str::<Holder>("size = \"lots\"").unwrap_err().to_string();
        assert!(err.contains("cannot parse size 'lots'"), "{err}");
    }

    #[test]
    fn an_optional_size_reads_null_as_not_given() {
        #[derive(serde::Deserialize)]
        struct Opt {
            #[serde(deserialize_with = "deserialize_opt_size")]
            size: Option<u64>,
        }
        assert_eq!(serde_json::from_str::<Opt>("{\"size\": null}").unwrap().size, None);
        assert_eq!(serde_json::from_str::<Opt>("{\"size\": \"4K\"}").unwrap().size, Some(4096));
    }

    #[test]
    fn sizes_format_as_users_write_them() {
        assert_eq!(format_size(4 << 20), "4M");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(12 << 10), "12K");
        assert_eq!(format_size(100_001), "100001");
        assert_eq!(format_size(0), "0");
    }
}
