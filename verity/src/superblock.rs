//! The veritysetup superblock (`struct verity_sb` of cryptsetup's `lib/verity/verity.c`):
//! 512 bytes at the hash offset, the rest of its 4 KiB block zero.

use crate::{VerityError, BLOCK, BLOCK_USIZE, MAX_SALT_LEN};

const MAGIC: &[u8; 8] = b"verity\0\0";
const ALGORITHM: &[u8] = b"sha256";

/// What a superblock says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Volume UUID (raw bytes).
    pub uuid: [u8; 16],
    /// Data blocks the tree covers.
    pub data_blocks: u64,
    /// The salt.
    pub salt: Vec<u8>,
}

impl Superblock {
    /// The 4 KiB block holding the superblock (format 1, SHA-256, 4 KiB blocks).
    pub fn encode(&self) -> Result<Vec<u8>, VerityError> {
        if self.salt.is_empty() || self.salt.len() > MAX_SALT_LEN {
            return Err(VerityError::SaltLen(self.salt.len()));
        }
        let mut b = vec![0u8; BLOCK_USIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes()); // superblock version
        b[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: salt first
        b[16..32].copy_from_slice(&self.uuid);
        b[32..32 + ALGORITHM.len()].copy_from_slice(ALGORITHM);
        let bs = u32::try_from(BLOCK).expect("4096 fits").to_le_bytes();
        b[64..68].copy_from_slice(&bs);
        b[68..72].copy_from_slice(&bs);
        b[72..80].copy_from_slice(&self.data_blocks.to_le_bytes());
        let salt_len = u16::try_from(self.salt.len()).expect("checked above");
        b[80..82].copy_from_slice(&salt_len.to_le_bytes());
        b[88..88 + self.salt.len()].copy_from_slice(&self.salt);
        Ok(b)
    }

    /// Parses the superblock block, refusing any variant keel does not write.
    pub fn decode(b: &[u8]) -> Result<Self, VerityError> {
        let bad = |s: &str| VerityError::Superblock(s.to_string());
        if b.len() < 512 {
            return Err(bad("shorter than 512 bytes"));
        }
        if &b[0..8] != MAGIC {
            return Err(bad("no \"verity\" signature"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        if u32_at(8) != 1 || u32_at(12) != 1 {
            return Err(VerityError::Superblock(format!(
                "version {} hash type {} (keel reads version 1, hash type 1)",
                u32_at(8),
                u32_at(12)
            )));
        }
        let alg_end = b[32..64].iter().position(|&c| c == 0).unwrap_or(32);
        if &b[32..32 + alg_end] != ALGORITHM {
            return Err(VerityError::Superblock(format!(
                "hash algorithm {:?} (keel reads sha256)",
                String::from_utf8_lossy(&b[32..32 + alg_end])
            )));
        }
        if u64::from(u32_at(64)) != BLOCK || u64::from(u32_at(68)) != BLOCK {
            return Err(bad("block sizes are not 4096"));
        }
        let salt_len = usize::from(u16::from_le_bytes([b[80], b[81]]));
        if salt_len == 0 || salt_len > MAX_SALT_LEN {
            return Err(VerityError::SaltLen(salt_len));
        }
        Ok(Superblock {
            uuid: b[16..32].try_into().expect("16 bytes"),
            data_blocks: u64::from_le_bytes(b[72..80].try_into().expect("8 bytes")),
            salt: b[88..88 + salt_len].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let sb = Superblock {
            uuid: [7; 16],
            data_blocks: 300,
            salt: vec![0x11; 32],
        };
        let b = sb.encode().unwrap();
        assert_eq!(b.len(), 4096);
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        let mut other = b.clone();
        other[32..38].copy_from_slice(b"sha512");
        assert!(Superblock::decode(&other)
            .unwrap_err()
            .to_string()
            .contains("sha512"));
        let mut other = b.clone();
        other[0] = b'X';
        assert!(Superblock::decode(&other).is_err());
        assert!(Superblock::decode(&b[..100]).is_err());
    }
}
