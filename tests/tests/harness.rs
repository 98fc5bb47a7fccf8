//! Tests of the harness itself: the real brokers start, stop, restart and keep what they
//! promised, and the cloud subscriber sees what is published.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use fieldgate_sim::Fault;
use fieldgate_tests::certs::TestPki;
use fieldgate_tests::fleet::check_sim_reading;
use fieldgate_tests::mosquitto::MosquittoTls;
use fieldgate_tests::{CloudSubscriber, Mosquitto, MosquittoOptions, NatsServer, SimFleet, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const WAIT: Duration = Duration::from_secs(60);

/// Publishes `n` QoS 1 messages with a throwaway rumqttc client and waits for every PUBACK.
async fn publish(port: u16, topic: &str, n: usize) {
    let mut opts = MqttOptions::new(format!("harness-pub-{}", rand::random::<u32>()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, n + 10);
    for i in 0..n {
        client.publish(topic, QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
    }
    let mut acked = 0;
    tokio::time::timeout(WAIT, async {
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                acked += 1;
            }
        }
    })
    .await
    .expect("PUBACKs");
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_keeps_its_session_across_a_broker_restart() {
    let mut broker = Mosquitto::start().await.unwrap();
    let sub = CloudSubscriber::start(&broker.url(), "harness-cloud-1", "t/#").await.unwrap();
    publish(broker.port(), "t/a", 5).await;
    sub.wait_for_count(5, WAIT).await.unwrap();

    broker.stop().await.unwrap();
    assert!(!broker.is_running());
    broker.start_again().await.unwrap();
    // Published before the subscriber is back: the restored session must queue it.
    publish(broker.port(), "t/b", 7).await;
    sub.wait_for_count(12, WAIT).await.unwrap();
    let msgs = sub.messages();
    assert_eq!(msgs.iter().filter(|m| m.topic == "t/b").count(), 7);
    assert!(sub.connects() >= 2);
    assert!(sub.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_reaches_the_subscriber() {
    let mosquitto_pub = fieldgate_tests::find_executable("FIELDGATE_MOSQUITTO_PUB", &[], "mosquitto_pub")
        .expect("mosquitto_pub is needed (Debian package mosquitto-clients)");
    let broker = Mosquitto::start().await.unwrap();
    let sub = CloudSubscriber::start(&broker.url(), "harness-cloud-2", "fieldgate/#").await.unwrap();
    let status = Command::new(mosquitto_pub)
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-q", "1", "-t", "fieldgate/default/x/telemetry", "-m", r#"{"id":"a","bufferSeq":1}"#])
        .status()
        .unwrap();
    assert!(status.success());
    sub.wait_for_count(1, WAIT).await.unwrap();
    let j = sub.messages()[0].json().unwrap();
    assert_eq!(j["id"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_keeps_acknowledged_messages_through_sigkill() {
    let mut nats = NatsServer::start().await.unwrap();
    let js = nats.jetstream().await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "h".into(),
        subjects: vec!["h.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..50 {
        js.publish("h.x", format!("{i}").into()).await.unwrap().await.unwrap();
    }
    nats.kill().unwrap();
    nats.start_again().await.unwrap();
    assert_eq!(nats.stream_state("h").await.unwrap().last_sequence, 50, "{}", nats.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_with_password_starts() {
    let pki = TestPki::generate().unwrap();
    let broker = Mosquitto::start_with(MosquittoOptions {
        tls: Some(MosquittoTls { pki, require_certificate: true }),
        password: Some(("gw".into(), "s3cret".into())),
        acl: None,
        bridges: Vec::new(),
    })
    .await
    .unwrap();
    assert!(broker.secure_url().unwrap().starts_with("mqtts://127.0.0.1:"));
    // The plain listener stays anonymous for the test's subscriber.
    let _sub = CloudSubscriber::start(&broker.url(), "harness-cloud-3", "#").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_answer_and_stop() {
    let mut fleet = SimFleet::start(&[Fault::None, Fault::Timeout]).await.unwrap();
    let ports = fleet.ports();
    assert_eq!(ports.len(), 2);
    assert_eq!(fleet.gateway_devices("1s")[1].name, "sim-0001");
    assert!(std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_ok());
    fleet.stop().await;
    wait_until("the simulator port to close", WAIT, || async {
        Ok(std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_err().then_some(()))
    })
    .await
    .unwrap();
    // The checker refuses a reading that lacks points.
    assert!(check_sim_reading(&[], &fleet.points()).is_err());
}
