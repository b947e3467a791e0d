// A bare Java consumer: the ceiling `segloop bench e2e --bootstrap` compares the pipeline with.
// Reads N records of a topic in a fresh group and prints the seconds from its first record, and
// from its N/10th (steady: the JIT has compiled the loop by then; the ceiling the bench uses).
// Run: java -cp "scripts/kafka/target/kafka-libs/*" benches/java/Consume.java BOOTSTRAP TOPIC GROUP N
import java.time.Duration;
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;

public class Consume {
    public static void main(String[] args) {
        Properties p = new Properties();
        p.put("bootstrap.servers", args[0]);
        p.put("group.id", args[2]);
        p.put("auto.offset.reset", "earliest");
        p.put("enable.auto.commit", "false");
        p.put("key.deserializer", "org.apache.kafka.common.serialization.ByteArrayDeserializer");
        p.put("value.deserializer", "org.apache.kafka.common.serialization.ByteArrayDeserializer");
        long want = Long.parseLong(args[3]);
        long n = 0;
        long first = 0;
        long tenth = 0;
        long bytes = 0;
        long deadline = System.nanoTime() + 300_000_000_000L;
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(p)) {
            consumer.subscribe(List.of(args[1]));
            while (n < want && System.nanoTime() < deadline) {
                ConsumerRecords<byte[], byte[]> records = consumer.poll(Duration.ofMillis(100));
                for (ConsumerRecord<byte[], byte[]> r : records) {
                    if (first == 0) {
                        first = System.nanoTime();
                    }
                    n++;
                    if (n == Math.max(1, want / 10)) {
                        tenth = System.nanoTime();
                    }
                    bytes += r.value() == null ? 0 : r.value().length;
                }
            }
        }
        long end = System.nanoTime();
        double secs = first == 0 ? 0 : (end - first) / 1e9;
        double steady = tenth == 0 ? 0 : (end - tenth) / 1e9;
        long steadyRecords = n - Math.max(1, want / 10);
        System.out.println("records=" + n + " secs=" + secs + " steady_records=" + steadyRecords
            + " steady_secs=" + steady + " bytes=" + bytes);
    }
}
