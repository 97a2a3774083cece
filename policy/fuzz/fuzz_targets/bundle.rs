//! Bundle parsing and verification on arbitrary bytes: as a whole token
//! (size limits, header allow-list, signature, claims), as bare claims JSON
//! (schema and every cross-check of `validate`), and through the unverified
//! decoder `airgate bundle inspect` uses. None may panic; none may accept.
#![no_main]

use airgate_policy::bundle::WireBundle;
use airgate_policy::bundle::verify::{TrustAnchor, TrustAnchors, decode_unverified, verify};
use airgate_policy::time::UnixTime;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let anchors = TrustAnchors::new([
        TrustAnchor::ed25519("authority", &[7u8; 32]).expect("anchor"),
    ]);
    // Random bytes carry no valid Ed25519 signature by this key.
    assert!(verify(data, &anchors, "site-7", UnixTime(1_795_000_000)).is_err());
    let _ = decode_unverified(data);
    if let Ok(wire) = serde_json::from_slice::<WireBundle>(data) {
        if let Ok(bundle) = wire.validate() {
            // Every reference of a validated bundle resolves.
            for tenant in bundle.tenants.values() {
                for model in &tenant.models {
                    assert!(bundle.models.contains_key(model));
                }
            }
            for model in bundle.models.values() {
                for licence in &model.licence_chain {
                    assert!(bundle.licences.contains_key(licence));
                }
            }
        }
    }
});
