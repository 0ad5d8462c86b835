//! Damaged metadata: 1,000 byte flips in used blocks of a pool made through the API must be
//! detected (a `Corrupt` error naming the block, or checker problems) and must never panic or
//! read past the device; plus hand-made damage where our checker and Debian's thin_check agree.

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::metadata::*;
use common::tools::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thinnbd::pdata::block_io::BLOCK_SIZE;
use thinnbd::thin::damage::{self, Flip};
use thinnbd::thin::{check, ThinMetadata};
use thinnbd::ErrorKind;

/// What damage may change without anyone being able to tell: times, ids, key positions. What
/// must be noticed: which data blocks each device maps, and its mapped_blocks count.
type Observable = BTreeMap<u32, (u64, Vec<u64>)>;

fn observable(v: &PoolView) -> Observable {
    v.iter()
        .map(|(dev, d, maps)| {
            let mut data: Vec<u64> = maps.iter().map(|m| m.1).collect();
            data.sort_unstable();
            (
                *dev,
                (d.mapped_blocks.wrapping_sub(maps.len() as u64), data),
            )
        })
        .collect()
}

/// The numbers a message mentions (block numbers among them).
fn numbers(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn read_through_api(io: Arc<ImageIo>) -> thinnbd::Result<PoolView> {
    let md = ThinMetadata::open(io)?;
    view(&md)
}

#[test]
fn thousand_flips_never_panic_and_are_detected() {
    let (image, md) = build_pool(2048);
    let used = damage::used_metadata_blocks(&md);
    assert!(
        used.len() > 50,
        "pool too small: {} used blocks",
        used.len()
    );
    let original = observable(&view(&md).unwrap());

    let clean = check::check(ImageIo::new(image.clone()));
    assert!(clean.is_clean(), "undamaged pool: {:#?}", clean.problems);
    assert_eq!(
        read_through_api(ImageIo::new(image.clone()))
            .map(|v| observable(&v))
            .ok(),
        Some(original.clone())
    );

    // THINNBD_DAMAGE_SEED picks another set of 1,000 cases (to explore; the default is fixed).
    let seed = std::env::var("THINNBD_DAMAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7417_c4ec);
    let mut rng = SmallRng::seed_from_u64(seed);
    let (mut api_errors, mut check_flagged, mut resealed_silent) = (0, 0, 0);
    for case in 0..1000 {
        let reseal = case % 3 == 2;
        let block = used[rng.gen_range(0..used.len())];
        // Resealed flips favour headers and keys, where structure checks matter most.
        let offset = if reseal && rng.gen_bool(0.5) {
            rng.gen_range(4..96)
        } else {
            rng.gen_range(0..BLOCK_SIZE)
        };
        let flip = Flip {
            block,
            offset,
            mask: rng.gen_range(1..=255),
            reseal,
        };
        let mut img = image.clone();
        assert!(damage::apply(&mut img, flip));
        let what = format!("case {case}: {flip:?}");

        let api_io = ImageIo::new(img.clone());
        let api = catch_unwind(AssertUnwindSafe(|| read_through_api(api_io.clone())))
            .unwrap_or_else(|_| panic!("{what}: ThinMetadata panicked"));
        let check_io = ImageIo::new(img);
        let report = catch_unwind(AssertUnwindSafe(|| check::check(check_io.clone())))
            .unwrap_or_else(|_| panic!("{what}: check panicked"));
        assert_eq!(
            check_io.out_of_range.load(Ordering::Relaxed),
            0,
            "{what}: check read past the device"
        );
        assert!(report.problems.len() <= check::MAX_PROBLEMS);

        if !report.is_clean() {
            check_flagged += 1;
            for p in &report.problems {
                assert!(
                    p.contains("block"),
                    "{what}: problem does not name a block: {p}"
                );
            }
            if !reseal {
                assert!(
                    report.problems.iter().any(|p| numbers(p).contains(&block)),
                    "{what}: no problem names the damaged block: {:#?}",
                    report.problems
                );
            }
        }
        match &api {
            Err(e) => {
                api_errors += 1;
                assert!(
                    matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Unsupported),
                    "{what}: unexpected error kind {e}"
                );
                let named = numbers(e.context());
                if reseal {
                    assert!(!named.is_empty(), "{what}: error names no block: {e}");
                } else {
                    assert!(
                        named.contains(&block),
                        "{what}: error does not name the block: {e}"
                    );
                }
                // A reader that refused the metadata must be backed by the checker.
                assert!(
                    !report.is_clean(),
                    "{what}: API failed ({e}) but check found nothing"
                );
            }
            Ok(v) => {
                let changed = observable(v) != original;
                if !reseal {
                    // A stale checksum is always caught by the checker; if the reader did not
                    // touch the block it must have seen the original data.
                    assert!(!report.is_clean(), "{what}: check missed a checksum error");
                    assert!(
                        !changed,
                        "{what}: reader returned damaged data without an error"
                    );
                } else if changed {
                    assert!(
                        !report.is_clean(),
                        "{what}: mappings changed but check found nothing"
                    );
                } else if report.is_clean() {
                    resealed_silent += 1;
                }
            }
        }
    }
    eprintln!(
        "1000 flips: API errors {api_errors}, check flagged {check_flagged}, \
         resealed flips with no visible effect {resealed_silent}"
    );
    assert!(
        check_flagged >= 667,
        "every unresealed flip must be flagged"
    );
}

/// Finds a used leaf of a device mapping tree (u64 values, keys beyond the device ids).
fn mapping_leaf(image: &[u8], used: &[u64]) -> u64 {
    let rd32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    *used
        .iter()
        .find(|&&b| {
            let blk = &image[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE];
            let kind = damage::block_kind(blk.try_into().unwrap());
            kind == Some(thinnbd::pdata::checksum::BlockKind::Node)
                && rd32(blk, 4) == 2
                && rd32(blk, 24) == 8
                && rd32(blk, 16) > 50
        })
        .expect("a mapping leaf")
}

#[test]
fn hand_damage_agrees_with_thin_check() {
    if !require_tool("thin_check") {
        return;
    }
    let (image, md) = build_pool(2048);
    let used = damage::used_metadata_blocks(&md);
    let sb = md.superblock().clone();
    let leaf = mapping_leaf(&image, &used);
    let meta_index = sb.metadata_sm_root.bitmap_root as usize;
    let meta_bitmap = u64::from_le_bytes(
        image[meta_index * BLOCK_SIZE + 16..meta_index * BLOCK_SIZE + 24]
            .try_into()
            .unwrap(),
    );

    // (name, flip, does 0.9.0 thin_check notice it)
    let cases = [
        (
            "mapping leaf checksum",
            Flip {
                block: leaf,
                offset: 3000,
                mask: 0x10,
                reseal: false,
            },
            true,
        ),
        (
            "superblock checksum",
            Flip {
                block: 0,
                offset: 200,
                mask: 1,
                reseal: false,
            },
            true,
        ),
        // nr_entries of the details tree root raised past the real entries (keys then repeat 0).
        (
            "details root nr_entries",
            Flip {
                block: sb.details_root,
                offset: 16,
                mask: 0x40,
                reseal: true,
            },
            true,
        ),
        // Superblock's own metadata count 1 -> 3 with no overflow entry.
        (
            "metadata bitmap count",
            Flip {
                block: meta_bitmap,
                offset: 16,
                mask: 0b01,
                reseal: true,
            },
            true,
        ),
        // A mapping's data block moved by one: only data ref counts show it, which 0.9.0
        // does not check (section 9 of the format notes); we must still flag it.
        (
            "mapping data block",
            Flip {
                block: leaf,
                offset: 2048 + 3,
                mask: 1,
                reseal: true,
            },
            false,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, flip, debian_notices) in cases {
        let mut img = image.clone();
        assert!(damage::apply(&mut img, flip));
        let path = dir.path().join("meta");
        std::fs::write(&path, &img).unwrap();
        let (ok, out, err) = run(Command::new("thin_check").arg(&path));
        let report = check::check(ImageIo::new(img));
        assert!(!report.is_clean(), "{name}: our check found nothing");
        assert_eq!(
            !ok, debian_notices,
            "{name}: thin_check exit status unexpected: {out}{err}"
        );
        eprintln!("{name}: ours: {:?}", report.problems.first());
    }
    let path = dir.path().join("meta");
    std::fs::write(&path, &image).unwrap();
    let (ok, out, err) = run(Command::new("thin_check").arg(&path));
    assert!(ok, "thin_check on the undamaged pool: {out}{err}");
    assert!(check::check(ImageIo::new(image)).is_clean());
}
