//! Which pages of code and read-only data a serving process may let go of.
//!
//! Starting up runs code that serving never runs again: opening the store runs most of RocksDB's
//! C++ (4.45 of its 4.57 MB of code were resident right after start), the argument parser, the
//! configuration's checks, the servers' setup; the dynamic loader reads the relocation tables.
//! The kernel maps a file's pages in 64 KiB windows around each page touched
//! (`fault_around_bytes`), and what a process has mapped stays in its resident set: right after
//! start, routing only, before any call, 17 of its 23.5 MiB were pages of files, 11.8 of them
//! the binary's code.
//!
//! So once every port serves, `modelgate serve` drops its mappings of the pages
//! [`releasable_mappings`] picks (`release_startup_pages` in `main.rs`, where unsafe code is
//! allowed) with `madvise(MADV_DONTNEED)`. The pages stay in the kernel's page cache: what runs
//! again is mapped again by a minor fault, without I/O, and the resident set comes back to what
//! serving uses. Nothing can be lost: only private mappings of files that are not writable and
//! hold no page of their own are picked, so every page in them is still the file's, and the next
//! access maps the file's page again. A mapping with a page of its own (`Anonymous:` above zero
//! in `smaps`) is left alone: the loader's read-only-after-relocation data (RELRO), which it
//! wrote before protecting it, or code a debugger patched.

/// The mappings of `/proc/self/smaps` text whose pages are all still those of their file and
/// can only be read: private (`p`), not writable, backed by a file (a path and an inode), with no
/// anonymous (copied-on-write) page. Returned as (start, end) address pairs.
pub fn releasable_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    // The mapping whose fields are being read, if it qualifies so far.
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(range) = mapping_header(line) {
            current = range;
            continue;
        }
        let Some(rest) = line.strip_prefix("Anonymous:") else {
            continue;
        };
        if let Some(range) = current.take() {
            let anonymous_kib = rest.trim().trim_end_matches("kB").trim().parse::<u64>();
            if anonymous_kib == Ok(0) {
                out.push(range);
            }
        }
    }
    out
}

/// For a mapping's first line in `smaps` (`start-end perms offset device inode path`), Some
/// with the range when the mapping is private, not writable and backed by a file, else
/// Some(None); None for the lines of fields that follow it.
fn mapping_header(line: &str) -> Option<Option<(usize, usize)>> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let (start, end) = (
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    );
    let perms = fields.next()?.as_bytes();
    let (_offset, _device) = (fields.next()?, fields.next()?);
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("");
    let releasable = perms.len() == 4
        && perms[0] == b'r'
        && perms[1] == b'-'
        && perms[3] == b'p'
        && inode != "0"
        && path.starts_with('/')
        && start < end;
    Some(releasable.then_some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unwritten_private_read_only_file_mappings_are_picked() {
        let smaps = "\
55d0c0a00000-55d0c0c00000 r--p 00000000 08:01 1234                       /usr/bin/modelgate
Size:               2048 kB
Rss:                1984 kB
Anonymous:             0 kB
55d0c0c00000-55d0c2000000 r-xp 00200000 08:01 1234                       /usr/bin/modelgate
Size:              20480 kB
Anonymous:             0 kB
55d0c2000000-55d0c2100000 r--p 01600000 08:01 1234                       /usr/bin/modelgate
Size:               1024 kB
Anonymous:           312 kB
55d0c2100000-55d0c2200000 rw-p 01700000 08:01 1234                       /usr/bin/modelgate
Anonymous:             8 kB
55d0c2200000-55d0c2300000 rw-p 00000000 00:00 0                          [heap]
Anonymous:          1024 kB
7f1000000000-7f1000200000 r-xp 00028000 08:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f1000200000-7f1000201000 r-xp 00029000 08:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             4 kB
7f2000000000-7f2000001000 rwxp 00000000 00:00 0
Anonymous:             4 kB
7f3000000000-7f3000001000 r--s 00000000 08:01 77                         /dev/shm/shared
Anonymous:             0 kB
7f4000000000-7f4000001000 ---p 00000000 08:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Anonymous:             0 kB
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
Anonymous:             0 kB
";
        assert_eq!(
            releasable_mappings(smaps),
            vec![
                (0x55d0c0a00000, 0x55d0c0c00000),
                (0x55d0c0c00000, 0x55d0c2000000),
                (0x7f1000000000, 0x7f1000200000),
            ]
        );
    }

    #[test]
    fn a_mapping_without_its_anonymous_field_or_torn_text_is_not_picked() {
        // A mapping whose fields are missing (a kernel without them, a truncated read) is not
        // known to be unwritten.
        let smaps = "\
55d0c0a00000-55d0c0c00000 r--p 00000000 08:01 1234 /usr/bin/modelgate
Size:               2048 kB
55d0c0c00000-55d0c2000000 r-xp 00200000 08:01 1234 /usr/bin/modelgate
Anonymous:          nonsense
7f1000000000-7f1000200000 r-xp 00028000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
";
        assert!(releasable_mappings(smaps).is_empty());
        assert!(releasable_mappings("").is_empty());
        assert!(releasable_mappings("garbage\n1-2 r-xp\nAnonymous: 0 kB").is_empty());
    }

    /// The picks from this very process: its code is among them, its written data is not.
    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_code_is_releasable_and_its_heap_is_not() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let picked = releasable_mappings(&smaps);
        let here = this_process_code_is_releasable_and_its_heap_is_not as *const () as usize;
        assert!(
            picked.iter().any(|&(s, e)| (s..e).contains(&here)),
            "the mapping of this test's own code is picked: {picked:x?}"
        );
        let heap = Box::new(0u64);
        let heap = &*heap as *const u64 as usize;
        assert!(!picked.iter().any(|&(s, e)| (s..e).contains(&heap)));
    }
}
