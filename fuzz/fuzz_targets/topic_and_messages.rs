//! Any bytes as a topic name and as the payload of every device topic:
//! refused or read, never a panic; a topic that parses names itself again,
//! and a block frame that reads writes back to the same bytes.
#![no_main]

use ferry_protocol::blocks::Frame;
use ferry_protocol::messages::{BlockRequest, Desired, Event, Health, Message, Reported, Status};
use ferry_protocol::topics::Topic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(topic) = text.parse::<Topic>() {
            assert_eq!(topic.to_string(), text, "a topic must print as it was read");
        }
    }
    let _ = Desired::decode(data);
    let _ = Reported::decode(data);
    let _ = Event::decode(data);
    let _ = Health::decode(data);
    let _ = Status::decode(data);
    if let Ok(request) = BlockRequest::decode(data) {
        assert!(request.check().is_ok());
    }
    if let Ok(frame) = Frame::decode(data) {
        assert_eq!(frame.encode(), data, "a frame must write back as it was read");
    }
});
