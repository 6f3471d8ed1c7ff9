//! The virtio-blk device as the guest sees it: feature bits, the configuration space
//! (`struct virtio_blk_config`, little-endian) and the limits requests are checked against.

use super::request::Limits;
use std::mem::{offset_of, size_of};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{ByteValued, Le16, Le32, Le64};

/// Bytes of `struct virtio_blk_config` we implement: everything up to and including
/// `write_zeroes_may_unmap` plus its padding (secure erase and zoned fields are not offered).
/// libblkio insists on exactly this size; QEMU asks for a prefix of it.
pub const CONFIG_LEN: usize = size_of::<VirtioBlkConfig>();

/// Largest single data segment we accept (advertised as `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard / write-zeroes range, in sectors (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Ranges per discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Smallest write the guest should prefer (advertised as `min_io_size`, at least one logical
/// block). A write to a present block is one direct host write of any sector-aligned size, but
/// ext4 and XFS take the exclusive inode lock for a direct write not aligned to their block
/// (4 KiB almost everywhere) that lands in reserved (unwritten) space, as the image's do.
pub const MIN_IO_BYTES: u32 = 4096;

/// Offset of the `wce` (writeback) byte, the only field the driver may write.
const WCE_OFFSET: usize = offset_of!(VirtioBlkConfig, wce);

/// The configuration space, virtio 1.2 section 5.2.4, up to the secure-erase fields.
/// virtio-bindings' `virtio_blk_config` has the same layout (checked below) but host-endian
/// fields and the secure-erase and zoned tails, and `ByteValued` cannot be implemented for it
/// here; this one is little-endian whatever the host.
#[repr(C, packed)]
#[derive(Copy, Clone, Debug, Default)]
struct VirtioBlkConfig {
    capacity: Le64,
    size_max: Le32,
    seg_max: Le32,
    geometry_cylinders: Le16,
    geometry_heads: u8,
    geometry_sectors: u8,
    blk_size: Le32,
    physical_block_exp: u8,
    alignment_offset: u8,
    min_io_size: Le16,
    opt_io_size: Le32,
    wce: u8,
    unused0: u8,
    num_queues: Le16,
    max_discard_sectors: Le32,
    max_discard_seg: Le32,
    discard_sector_alignment: Le32,
    max_write_zeroes_sectors: Le32,
    max_write_zeroes_seg: Le32,
    write_zeroes_may_unmap: u8,
    unused1: [u8; 3],
}

// SAFETY: a packed struct of integers and integer arrays: no padding, and every byte pattern is
// a valid value.
unsafe impl ByteValued for VirtioBlkConfig {}

// Same layout as the kernel's header (virtio-bindings), field by field: `ours` where the names
// agree, `ours = theirs.sub` for the geometry, which the kernel's struct nests.
macro_rules! same_offsets {
    ($($ours:ident $(= $theirs:ident . $sub:ident)?),* $(,)?) => {
        $(const _: () = assert!(
            offset_of!(VirtioBlkConfig, $ours) == same_offsets!(@theirs $ours $($theirs . $sub)?)
        );)*
    };
    (@theirs $ours:ident) => {
        offset_of!(virtio_blk_config, $ours)
    };
    (@theirs $ours:ident $theirs:ident . $sub:ident) => {
        offset_of!(virtio_blk_config, $theirs)
            + offset_of!(virtio_blk_config_virtio_blk_geometry, $sub)
    };
}
same_offsets! {
    capacity, size_max, seg_max,
    geometry_cylinders = geometry.cylinders,
    geometry_heads = geometry.heads,
    geometry_sectors = geometry.sectors,
    blk_size, physical_block_exp, alignment_offset, min_io_size, opt_io_size, wce, num_queues,
    max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
    max_write_zeroes_seg, write_zeroes_may_unmap,
}
const _: () = assert!(CONFIG_LEN == offset_of!(virtio_blk_config, max_secure_erase_sectors));

/// What the device exposes; fixed for the life of a connection except `writeback`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Disk size in bytes (rounded down to whole sectors when advertised).
    pub capacity: u64,
    /// Logical block size advertised in `blk_size` (512 or 4096).
    pub block_size: u32,
    /// Preferred write size and alignment in bytes (`opt_io_size`; 0: no preference): an FVD
    /// image's block size, since the first write to a block fills all of it.
    pub optimal_io: u32,
    pub read_only: bool,
    /// The disk supports discard; enables DISCARD and WRITE_ZEROES.
    pub discard: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Write-back cache visible to the guest (it then sends FLUSH). Guests may switch it off
    /// through the `wce` field; the server then flushes after every write.
    pub writeback: bool,
}

impl DeviceConfig {
    /// Most data descriptors per request (advertised as `seg_max`): the queue size minus the
    /// header and status descriptors, as QEMU does.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// virtio feature bits offered to the frontend.
    pub fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else if self.discard {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// vhost-user protocol features offered.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            // CONFIG_CHANGE_MSG tells the frontend about a resize (`ServerHandle::resize`).
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // Requests in flight survive a crash of the server (`inflight`).
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    /// The whole configuration space.
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let lbs = self.block_size.max(512);
        let discard = self.discard && !self.read_only;
        let if_discard = |v: u32| Le32::from(if discard { v } else { 0 });
        let c = VirtioBlkConfig {
            capacity: (self.capacity / 512).into(),
            size_max: SIZE_MAX.into(),
            seg_max: self.seg_max().into(),
            // geometry stays zero: VIRTIO_BLK_F_GEOMETRY is not offered.
            blk_size: lbs.into(),
            // Physical block == logical block, no offset; sizes in logical blocks.
            // At most 8 (4096 / 512).
            min_io_size: ((MIN_IO_BYTES.max(lbs) / lbs) as u16).into(),
            opt_io_size: (self.optimal_io / lbs).into(),
            wce: u8::from(self.writeback),
            num_queues: self.num_queues.into(),
            max_discard_sectors: if_discard(MAX_DISCARD_SECTORS),
            max_discard_seg: if_discard(MAX_DISCARD_SEG),
            discard_sector_alignment: if_discard(lbs / 512),
            max_write_zeroes_sectors: if_discard(MAX_DISCARD_SECTORS),
            max_write_zeroes_seg: if_discard(MAX_DISCARD_SEG),
            write_zeroes_may_unmap: u8::from(discard),
            ..Default::default()
        };
        let mut out = [0u8; CONFIG_LEN];
        out.copy_from_slice(c.as_slice());
        out
    }

    /// Answer to GET_CONFIG: exactly `size` bytes from `offset`, or an empty vector (which the
    /// vhost-user layer turns into an error reply) if the range is outside the config space.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let (off, size) = (offset as usize, size as usize);
        match off.checked_add(size) {
            Some(end) if end <= CONFIG_LEN && size > 0 => self.encode()[off..end].to_vec(),
            _ => Vec::new(),
        }
    }

    /// SET_CONFIG: only `wce` is writable. Returns false for anything else (left unchanged).
    pub fn write(&mut self, offset: u32, data: &[u8]) -> bool {
        if offset as usize == WCE_OFFSET && data.len() == 1 {
            self.writeback = data[0] != 0;
            return true;
        }
        false
    }

    /// What requests are validated against.
    pub fn limits(&self) -> Limits {
        let discard = self.discard && !self.read_only;
        Limits {
            capacity: self.capacity / 512 * 512,
            read_only: self.read_only,
            seg_max: self.seg_max(),
            size_max: SIZE_MAX,
            discard,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
        }
    }
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeviceConfig {
        DeviceConfig {
            capacity: (1 << 30) + 700,
            block_size: 4096,
            optimal_io: 65536,
            read_only: false,
            discard: true,
            num_queues: 3,
            queue_size: 256,
            writeback: true,
        }
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// The struct against the spec's table (virtio 1.2, 5.2.4), independently of
    /// virtio-bindings: each field set to a distinct value lands at its offset, little-endian.
    #[test]
    fn layout_is_the_spec_layout() {
        assert_eq!(CONFIG_LEN, 60);
        let c = VirtioBlkConfig {
            capacity: 0x0807_0605_0403_0201u64.into(),
            size_max: 0x1111_1110u32.into(),
            seg_max: 0x1212_1211u32.into(),
            geometry_cylinders: 0x1313u16.into(),
            geometry_heads: 0x14,
            geometry_sectors: 0x15,
            blk_size: 0x1616_1617u32.into(),
            physical_block_exp: 0x18,
            alignment_offset: 0x19,
            min_io_size: 0x1a1bu16.into(),
            opt_io_size: 0x1c1d_1e1fu32.into(),
            wce: 0x20,
            unused0: 0,
            num_queues: 0x2122u16.into(),
            max_discard_sectors: 0x2324_2526u32.into(),
            max_discard_seg: 0x2728_292au32.into(),
            discard_sector_alignment: 0x2b2c_2d2eu32.into(),
            max_write_zeroes_sectors: 0x3132_3334u32.into(),
            max_write_zeroes_seg: 0x3536_3738u32.into(),
            write_zeroes_may_unmap: 0x39,
            unused1: [0; 3],
        };
        let b = c.as_slice();
        assert_eq!(b.len(), 60);
        let le = |off: usize, len: usize| {
            b[off..off + len]
                .iter()
                .rev()
                .fold(0u64, |a, &x| a << 8 | u64::from(x))
        };
        for (off, len, v) in [
            (0, 8, 0x0807_0605_0403_0201u64),
            (8, 4, 0x1111_1110),
            (12, 4, 0x1212_1211),
            (16, 2, 0x1313),
            (18, 1, 0x14),
            (19, 1, 0x15),
            (20, 4, 0x1616_1617),
            (24, 1, 0x18),
            (25, 1, 0x19),
            (26, 2, 0x1a1b),
            (28, 4, 0x1c1d_1e1f),
            (32, 1, 0x20),
            (33, 1, 0),
            (34, 2, 0x2122),
            (36, 4, 0x2324_2526),
            (40, 4, 0x2728_292a),
            (44, 4, 0x2b2c_2d2e),
            (48, 4, 0x3132_3334),
            (52, 4, 0x3536_3738),
            (56, 1, 0x39),
            (57, 3, 0),
        ] {
            assert_eq!(le(off, len), v, "field at offset {off}");
        }
        assert_eq!(WCE_OFFSET, 32);
    }

    #[test]
    fn topology_follows_the_image() {
        let c = cfg().encode();
        assert_eq!(c[24], 0, "physical block = logical block");
        assert_eq!(c[25], 0, "no alignment offset");
        assert_eq!(
            u16::from_le_bytes([c[26], c[27]]),
            1,
            "4 KiB in 4 KiB blocks"
        );
        assert_eq!(le32(&c, 28), 16, "64 KiB in 4 KiB blocks");
        let small = DeviceConfig {
            block_size: 512,
            optimal_io: 1 << 20,
            ..cfg()
        }
        .encode();
        assert_eq!(le32(&small, 20), 512);
        assert_eq!(u16::from_le_bytes([small[26], small[27]]), 8);
        assert_eq!(le32(&small, 28), 2048);
        assert_eq!(le32(&small, 44), 1, "discard alignment in sectors");
        let raw = DeviceConfig {
            optimal_io: 0,
            ..cfg()
        }
        .encode();
        assert_eq!(le32(&raw, 28), 0, "no preferred size");
    }

    #[test]
    fn encodes_virtio_blk_config_layout() {
        let c = cfg().encode();
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512 + 1
        );
        assert_eq!(le32(&c, 8), SIZE_MAX);
        assert_eq!(le32(&c, 12), 254);
        assert_eq!(le32(&c, 20), 4096);
        assert_eq!(c[32], 1, "write-back cache must be visible");
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3);
        assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 40), MAX_DISCARD_SEG);
        assert_eq!(le32(&c, 44), 8);
        assert_eq!(le32(&c, 48), MAX_DISCARD_SECTORS);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn features_follow_the_disk() {
        let f = cfg().features();
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ] {
            assert_ne!(f & bit(b), 0, "bit {b}");
        }
        assert_ne!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);

        let ro = DeviceConfig {
            read_only: true,
            ..cfg()
        };
        let f = ro.features();
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(ro.encode()[36..57], [0u8; 21]);

        let nodiscard = DeviceConfig {
            discard: false,
            ..cfg()
        };
        assert_eq!(nodiscard.features() & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert!(!nodiscard.limits().discard);
    }

    #[test]
    fn get_config_answers_exactly_the_size_asked() {
        let c = cfg();
        let full = c.encode();
        // libblkio / cloud-hypervisor (60), QEMU (57), the capacity alone.
        for size in [60u32, 57, 8, 1] {
            assert_eq!(c.read(0, size), full[..size as usize]);
        }
        assert_eq!(c.read(32, 1), [1]);
        assert!(c.read(0, 61).is_empty());
        assert!(c.read(59, 2).is_empty());
        assert!(c.read(0, 0).is_empty());
        assert!(c.read(u32::MAX, 2).is_empty());
        assert!(c.read(0x100, 60).is_empty());
    }

    #[test]
    fn only_wce_is_writable() {
        let mut c = cfg();
        assert!(c.write(32, &[0]));
        assert!(!c.writeback);
        assert_eq!(c.read(32, 1), [0]);
        assert!(!c.write(0, &[0; 8]));
        assert!(!c.write(32, &[1, 1]));
        assert_eq!(c.capacity, cfg().capacity);
    }
}
