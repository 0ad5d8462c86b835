//! The connection's pool of large frame buffers (write payloads, read replies).

/// Frames smaller than this are left to the allocator, which serves them quickly.
const POOLED_MIN: usize = 64 << 10;
/// Frames larger than this are not kept but freed after use: a pool of maximum-size buffers
/// would pin `POOLED_COUNT` maximum requests' worth of memory per connection.
const POOLED_MAX: usize = (1 << 20) + 64;
/// Buffers kept per connection.
const POOLED_COUNT: usize = 16;

/// Large frame buffers kept for reuse within one connection: a 1 MiB read or write would
/// otherwise allocate, zero and fault in fresh memory on every request.
#[derive(Default)]
pub(super) struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // Only whole buffers are pushed and popped; a poisoned pool is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of `len` bytes whose contents are unspecified (a reused buffer keeps old
    /// bytes): the caller overwrites all of it before it leaves the connection.
    pub(super) fn take(&self, len: usize) -> Vec<u8> {
        if len >= POOLED_MIN {
            if let Some(mut v) = self.pool().pop() {
                v.resize(len, 0);
                return v;
            }
        }
        vec![0u8; len]
    }

    pub(super) fn put(&self, v: Vec<u8>) {
        if (POOLED_MIN..=POOLED_MAX).contains(&v.capacity()) {
            let mut pool = self.pool();
            if pool.len() < POOLED_COUNT {
                pool.push(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_small_and_huge_ones_are_not() {
        let b = Buffers::default();
        let v = b.take(1 << 20);
        assert_eq!(v.len(), 1 << 20);
        let ptr = v.as_ptr();
        b.put(v);
        let again = b.take((1 << 20) - 100);
        assert_eq!((again.len(), again.as_ptr()), ((1 << 20) - 100, ptr));
        b.put(vec![0u8; 4096]);
        b.put(vec![0u8; 32 << 20]);
        assert!(b.pool().is_empty(), "only 64 KiB to 1 MiB buffers are kept");
        for _ in 0..2 * POOLED_COUNT {
            b.put(vec![0u8; 128 << 10]);
        }
        assert_eq!(b.pool().len(), POOLED_COUNT);
        assert_eq!(
            b.take(100).capacity(),
            100,
            "small frames come from the allocator"
        );
    }
}
