//! After a restart the engine learns which free data blocks still read zeros (holes in the
//! sparse data file), so a partial write that provisions one does not zero the rest of it;
//! blocks that hold old data are still zero-filled.

use std::os::unix::fs::FileExt;

use thinnbd::engine::{EngineConfig, Pool};

const BLOCK: u64 = 64 << 10;

fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn provisioning_after_reopen_skips_zeroing_of_holes_but_not_of_old_data() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, data) = (dir.path().join("metadata"), dir.path().join("data"));
    let pool = Pool::create(&meta, &data, 64 << 20, BLOCK, EngineConfig::default()).unwrap();
    pool.create_thin(0).unwrap();
    pool.create_thin(1).unwrap();
    // Thin 1 fills eight blocks, then is deleted: the delete gives the blocks back to the file
    // system (as discards do).
    let t1 = pool.activate(1, 16 << 20, false).unwrap();
    t1.write(0, &vec![0xee; 8 * BLOCK as usize], true).unwrap();
    pool.teardown(t1).unwrap();
    let used = allocated_bytes(&data);
    pool.delete_thin(1).unwrap();
    assert!(
        allocated_bytes(&data) + 8 * BLOCK <= used,
        "delete punched the freed blocks"
    );
    pool.flush().unwrap();
    pool.shutdown().unwrap();
    drop(pool);

    // Free blocks holding old bytes (left, say, by a file system that cannot punch holes): they
    // must still be zero-filled when reused.
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    f.write_all_at(&vec![0xee; 4 * BLOCK as usize], 4 * BLOCK)
        .unwrap();
    drop(f);

    let pool = Pool::open(&meta, &data, EngineConfig::default()).unwrap();
    let t0 = pool.activate(0, 16 << 20, false).unwrap();
    let before = allocated_bytes(&data);
    // Small writes to many fresh blocks: each provisions a block. Whether the rest of each
    // block reads zeros is what matters; whether it was written shows in the file's size.
    for i in 0..64u64 {
        t0.write(i * BLOCK, &[0x5a; 4096], false).unwrap();
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..64u64 {
        t0.read(i * BLOCK, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 0x5a), "block {i}: data");
        assert!(
            buf[4096..].iter().all(|b| *b == 0),
            "block {i}: the rest reads zeros"
        );
    }
    let grown = allocated_bytes(&data) - before;
    // 64 writes of 4 KiB; zero-filling every block would add 64 x 64 KiB = 4 MiB. Only the
    // four stale blocks that were not punched need zeroing (4 x 60 KiB).
    assert!(
        grown < 2 << 20,
        "holes were zero-filled: the data file grew by {grown} bytes"
    );
    pool.teardown(t0).unwrap();
    pool.shutdown().unwrap();
}
