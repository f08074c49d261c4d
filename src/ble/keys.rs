//! BLE channel keys (BleSKReader / BleSKDevice) and the encrypted notifications they protect.
//!
//! Both sides compute the same transaction IKM as for the expedited channel (ECDH of the two
//! ephemeral keys, X9.63 with the transaction id), expand it with the volatile salt (interface
//! byte C3) and take the BLE input key material from the 160-byte output; BleSK{Reader,Device}
//! = HKDF(that, salt = supported BLE versions || selected version, "BleSKReader"/"BleSKDevice").
//! That salt is aliro-actuator's; the vectors README (disagreement 2) records that kormax would
//! use 32 zero bytes. Notifications after key establishment are AES-256-GCM with
//! AAD = type || id || 2-byte plaintext length, IV = direction || counter (own counter per
//! direction, starting at 1).

use p256::{PublicKey, SecretKey};

use crate::aliro::crypto::{CryptoError, Role, SecureChannel};
use crate::aliro::keys::{self, TranscriptContext};

use super::message::{FrameError, Message, HEADER_LEN};

/// The BLE protocol versions that enter the BLE key salt: what the reader publishes in its GATT
/// characteristic and what the phone selected (written to the device characteristic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BleVersions {
    pub supported: Vec<[u8; 2]>,
    pub selected: [u8; 2],
}

impl Default for BleVersions {
    fn default() -> Self {
        Self {
            supported: vec![super::BLE_PROTOCOL_VERSION],
            selected: super::BLE_PROTOCOL_VERSION,
        }
    }
}

impl BleVersions {
    /// The HKDF salt of the BLE keys: supported versions || selected version.
    pub fn salt(&self) -> Vec<u8> {
        let mut s: Vec<u8> = self.supported.concat();
        s.extend_from_slice(&self.selected);
        s
    }
}

/// The encrypted-notification channel of one connection.
pub struct NotificationChannel {
    channel: SecureChannel,
}

impl std::fmt::Debug for NotificationChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotificationChannel")
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// Why a notification could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotificationError {
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
}

impl NotificationChannel {
    /// Derives BleSKReader / BleSKDevice for `role` from this side's ephemeral key, the peer's
    /// ephemeral key and the transcript (interface byte C3).
    pub fn derive(
        role: Role,
        own_ephemeral: &SecretKey,
        peer_ephemeral: &PublicKey,
        ctx: &TranscriptContext,
        versions: &BleVersions,
    ) -> Result<Self, CryptoError> {
        let ikm = keys::transaction_ikm(own_ephemeral, peer_ephemeral, &ctx.transaction_id)?;
        let volatile = keys::derive_volatile(&ikm, ctx)?;
        let (sk_reader, sk_device) = keys::derive_ble(&volatile.ble_ikm, &versions.salt())?;
        Ok(Self {
            channel: SecureChannel::new(role, sk_reader, sk_device),
        })
    }

    /// An encrypted notification frame (type 02) with id `id` around `plaintext`.
    pub fn seal(&mut self, id: u8, plaintext: &[u8]) -> Result<Vec<u8>, NotificationError> {
        let aad = Message::header(super::message::PROTOCOL_NOTIFICATION, id, plaintext.len())?;
        let ct = self.channel.seal_with_aad(&aad, plaintext)?;
        Ok(Message::new(super::message::PROTOCOL_NOTIFICATION, id, ct).encode()?)
    }

    /// Decrypts the payload of a received encrypted (non-AP) message.
    pub fn open(&mut self, msg: &Message) -> Result<Vec<u8>, NotificationError> {
        let plain_len = msg
            .payload
            .len()
            .checked_sub(crate::aliro::crypto::GCM_TAG_LEN)
            .ok_or(CryptoError::Decrypt)?;
        let aad: [u8; HEADER_LEN] = Message::header(msg.protocol, msg.id, plain_len)?;
        Ok(self.channel.open_with_aad(&aad, &msg.payload)?)
    }
}
