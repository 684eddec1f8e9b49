use std::sync::Arc;

use rust_decimal_macros::dec;

use super::*;

fn share(device: u32, kind: DeviceKind) -> DeviceShare {
    DeviceShare {
        device: DeviceId(device),
        name: format!("dev{device}"),
        kind,
        estimated: device.is_multiple_of(2),
        dynamic_j: 0.441_935_365_758_133_4,
        idle_j: 0.080_351_886_683_757_85,
        uncertainty_j: 0.207_489_035_058,
        sensor_j: 0.008_292_929_709_859_873,
        coverage_j: 1e-300,
        split_j: -0.0,
    }
}

/// Every optional part present, odd values (extremes, negative zero, non-ASCII text).
fn full() -> FinalRecord {
    FinalRecord {
        record: RequestRecord {
            id: RequestId(u64::MAX - 1),
            external_id: Some("chatcmpl-Ωx".into()),
            service: ServiceId(7),
            model: Some("llama-3-8b".into()),
            tenant: Some("acme".into()),
            arrive_ns: 61_523_484_639_486,
            first_byte_ns: Some(61_523_484_789_438),
            first_event_ns: Some(61_523_484_800_000),
            end_ns: 61_523_584_789_438,
            outcome: Outcome::ClosedEarly,
            prompt_tokens: Some(14),
            cached_tokens: Some(0),
            completion_tokens: Some(4096),
            events: 4096,
            response_bytes: 1 << 40,
            devices: vec![share(0, DeviceKind::Gpu), share(3, DeviceKind::Dram)],
            dynamic_j: 123.456,
            idle_j: f64::MIN_POSITIVE,
            total_j: 123.456 + f64::MIN_POSITIVE,
            kwh: 3.429_333e-5,
            joules_per_output_token: Some(0.030_140_625),
            occupancy: Some(15.0),
            uncertainty_j: 1.5,
            coverage_gap_ns: 10_000_000,
        },
        service_name: "vllm on port 8000".into(),
        workload: Some(Arc::new(Workload {
            namespace: Some("ns".into()),
            pod: Some("pod-1".into()),
            container: Some("engine".into()),
            pod_uid: Some("uid".into()),
            container_id: Some("c0ffee".into()),
            runtime: Some("containerd".into()),
            unit: Some("vllm.service".into()),
        })),
        end_unix_ms: 1_796_564_206_835,
        cost: Some(RecordCost {
            amount: dec!(0.000012345),
            bar: dec!(0.000000150),
            currency: "EUR".into(),
            price_per_kwh: dec!(0.2512),
            pue: dec!(1.35),
            emissions_g: Some(0.0123),
        }),
    }
}

/// Nothing optional present (the no-op load's shape, one CPU device).
fn bare() -> FinalRecord {
    let mut f = full();
    let r = &mut f.record;
    r.id = RequestId(1);
    r.external_id = None;
    r.tenant = None;
    r.model = None;
    r.first_byte_ns = None;
    r.first_event_ns = None;
    r.outcome = Outcome::Complete;
    r.prompt_tokens = None;
    r.cached_tokens = None;
    r.completion_tokens = None;
    r.devices = vec![share(0, DeviceKind::CpuPackage)];
    r.joules_per_output_token = None;
    r.occupancy = None;
    f.workload = None;
    f.cost = None;
    f
}

fn row(f: &FinalRecord) -> Vec<u8> {
    let mut out = vec![0xAA; 3];
    encode(f, &mut out).expect("encode");
    out
}

#[test]
fn a_row_reads_back_as_the_record_it_was_written_from() {
    for f in [full(), bare()] {
        let back = decode(&row(&f)).expect("decode");
        assert_eq!(back, f);
        // The same JSON out (what the API sends), float bits and decimals included.
        assert_eq!(
            serde_json::to_string(&back).expect("json"),
            serde_json::to_string(&f).expect("json")
        );
        assert_eq!(
            back.record.devices[0].split_j.to_bits(),
            f.record.devices[0].split_j.to_bits()
        );
    }
}

#[test]
fn every_outcome_and_device_kind_has_a_code_that_reads_back() {
    for o in [
        Outcome::Complete,
        Outcome::ClosedEarly,
        Outcome::Truncated,
        Outcome::Aborted,
        Outcome::Incomplete,
    ] {
        assert_eq!(outcome_of(outcome_code(o)).expect("outcome"), o);
    }
    for k in [
        DeviceKind::Gpu,
        DeviceKind::CpuPackage,
        DeviceKind::Dram,
        DeviceKind::Other,
    ] {
        assert_eq!(kind_of(kind_code(k)).expect("kind"), k);
    }
}

/// Stored rows must read the same in every later build: these bytes are format 1. If this
/// fails, the change made a new format (see the module docs), it did not fix this test.
#[test]
fn format_1_is_frozen() {
    let hex = row(&full()).iter().fold(String::new(), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    });
    assert_eq!(hex, FULL_FORMAT_1);
}

const FULL_FORMAT_1: &str = concat!(
    "01feffffffffffffffff01010c63686174636d706c2dcea97807010a6c6c616d612d332d3862010461636d65",
    "fe81caebc8fe0d01be95d3ebc8fe0d0180e8d3ebc8fe0dbed7aa9bc9fe0d01010e0100018020802080808080",
    "80200200046465763000017620b845ab48dc3f03887af5f091b43f8525ed2d008fca3f528f222fe2fb803f59",
    "f3f8c21f6ea501000000000000008003046465763302007620b845ab48dc3f03887af5f091b43f8525ed2d00",
    "8fca3f528f222fe2fb803f59f3f8c21f6ea501000000000000008077be9f1a2fdd5e40000000000000100077",
    "be9f1a2fdd5e4090a5b8d8c5fa013f0177be9f1a2fdd9e3f010000000000002e40000000000000f83f80ade2",
    "0411766c6c6d206f6e20706f727420383030300101026e730105706f642d310106656e67696e650103756964",
    "0106633066666565010a636f6e7461696e657264010c766c6c6d2e73657276696365e69392b9c96801000009",
    "00393000000000000000000000000009009600000000000000000000000345555200000400d0090000000000",
    "000000000000000200870000000000000000000000018d28ed0dbe30893f",
);

#[test]
fn a_row_is_a_fraction_of_the_json() {
    let f = bare();
    let json = serde_json::to_string(&f).expect("json").len();
    let bytes = row(&f).len();
    assert!(bytes * 3 < json, "row {bytes} bytes, JSON {json}");
}

#[test]
fn damaged_rows_are_errors_not_panics() {
    assert!(matches!(decode(&[]), Err(RowError::Format(None))));
    assert!(matches!(decode(&[9, 1, 2]), Err(RowError::Format(Some(9)))));
    let good = row(&full());
    for cut in 1..good.len() {
        assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
    }
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(decode(&long), Err(RowError::Trailing(1))));
    // The outcome's code, changed to one no build wrote.
    let f = bare();
    let mut r = Row::of(&f);
    r.outcome = 200;
    let bad = postcard::to_extend(&r, vec![FORMAT_1]).expect("encode");
    assert!(matches!(
        decode(&bad),
        Err(RowError::Code {
            what: "outcome",
            code: 200
        })
    ));
}
