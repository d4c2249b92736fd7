//! Plain-old-data conversions between skeleton types and map bytes.

/// The bytes of a `#[repr(C)]` skeleton type (key or value).
pub fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a Copy, repr(C) map type or an integer: any byte view of it is valid to read.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// A skeleton type from map bytes (unaligned, short input zero-padded).
pub fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    let n = b.len().min(std::mem::size_of::<T>());
    // SAFETY: we write at most size_of::<T>() bytes into a valid T made of integers.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, n) };
    v
}
