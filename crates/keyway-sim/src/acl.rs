//! Synthetic ACL files for tests and benchmarks: `n` distinct valid P-256 endpoint keys
//! (`k·G` for consecutive `k`: a point addition and an inversion each, several times cheaper
//! than a scalar multiplication per key).

use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{ProjectivePoint, Scalar};
use std::io::Write;

/// Keys `(first + i)·G` for `i` in `0..n`, uncompressed (65 bytes), to `each`.
pub fn for_each_key(first: u64, n: u64, mut each: impl FnMut(u64, [u8; 65])) {
    let mut p = ProjectivePoint::GENERATOR * Scalar::from(first.max(1));
    for i in 0..n {
        let mut k = [0u8; 65];
        k.copy_from_slice(p.to_affine().to_encoded_point(false).as_bytes());
        each(i, k);
        p += ProjectivePoint::GENERATOR;
    }
}

/// Writes a CSV ACL of `n` credentials (keys from `first`), every one allowed at `door`.
pub fn write_csv(path: &std::path::Path, first: u64, n: u64, door: &str) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        out,
        "endpoint_key,person_id,card_format,facility_code,card_number,valid_from,valid_until,doors"
    )?;
    let mut err = Ok(());
    for_each_key(first, n, |i, k| {
        if err.is_ok() {
            err = writeln!(
                out,
                "{},E-{:07},h10301,{},{},,,{door}",
                hex::encode(k),
                first + i,
                (first + i) % 256,
                (first + i) % 65536
            );
        }
    });
    err?;
    out.flush()
}

/// Writes a version-1 JSON ACL of the same `n` credentials as [`write_csv`] (one credential
/// object per line), streamed: memory does not grow with `n`.
pub fn write_json(path: &std::path::Path, first: u64, n: u64, door: &str) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "{{\n  \"version\": 1,\n  \"credentials\": [")?;
    let mut err = Ok(());
    for_each_key(first, n, |i, k| {
        if err.is_ok() {
            err = writeln!(
                out,
                "    {{\"endpoint_key\": \"{}\", \"person_id\": \"E-{:07}\", \"card_format\": \
                 \"h10301\", \"facility_code\": {}, \"card_number\": {}, \"doors\": [\"{door}\"]}}{}",
                hex::encode(k),
                first + i,
                (first + i) % 256,
                (first + i) % 65536,
                if i + 1 < n { "," } else { "" }
            );
        }
    });
    err?;
    writeln!(out, "  ]\n}}")?;
    out.flush()
}

/// A CSV of `n` credentials (keys from 1, all at door `front`) kept as
/// `<dir>/acl-scale-<n>.csv`, generated once (written aside and renamed, so an interrupted
/// run leaves no truncated file): big ACLs take a while to generate and tests and benches
/// share them.
pub fn cached_csv(dir: &std::path::Path, n: u64) -> std::io::Result<std::path::PathBuf> {
    let path = dir.join(format!("acl-scale-{n}.csv"));
    if !path.exists() {
        let tmp = dir.join(format!("acl-scale-{n}.csv.{}.tmp", std::process::id()));
        write_csv(&tmp, 1, n, "front")?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used)]

    #[test]
    fn json_and_csv_files_hold_the_same_valid_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let (csv, json) = (dir.path().join("a.csv"), dir.path().join("a.json"));
        super::write_csv(&csv, 5, 3, "front").unwrap();
        super::write_json(&json, 5, 3, "front").unwrap();
        let c = keyway::acl::import::load_file(&csv).unwrap();
        let j = keyway::acl::import::load_file(&json).unwrap();
        assert_eq!(c.len(), 3);
        let strip = |v: Vec<keyway::acl::CredentialSpec>| {
            v.into_iter()
                .map(|s| (s.endpoint_key, s.person_id, s.card_number, s.doors))
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(c), strip(j));
    }
}
