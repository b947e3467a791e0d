// Produces telemetry with the Java client and its default partitioner (murmur2), to prove
// segloop's co-partitioning with Java producers. Reads "key<TAB>hex payload" lines on stdin.
// Run: java -cp "scripts/kafka/target/kafka-libs/*" tests/java/Produce.java BOOTSTRAP TOPIC [KEY=VALUE...]
// (extra producer properties, e.g. compression.type=zstd)
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.Properties;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;

public class Produce {
    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.put("bootstrap.servers", args[0]);
        p.put("key.serializer", "org.apache.kafka.common.serialization.StringSerializer");
        p.put("value.serializer", "org.apache.kafka.common.serialization.ByteArraySerializer");
        for (int i = 2; i < args.length; i++) {
            String[] kv = args[i].split("=", 2);
            p.put(kv[0], kv[1]);
        }
        int n = 0;
        try (KafkaProducer<String, byte[]> producer = new KafkaProducer<>(p);
             BufferedReader in = new BufferedReader(new InputStreamReader(System.in))) {
            String line;
            while ((line = in.readLine()) != null) {
                String[] kv = line.split("\t");
                RecordMetadata md = producer.send(new ProducerRecord<>(args[1], kv[0], hex(kv[1]))).get();
                System.out.println(kv[0] + "\t" + md.partition());
                n++;
            }
        }
        System.err.println("produced " + n);
    }

    static byte[] hex(String s) {
        byte[] b = new byte[s.length() / 2];
        for (int i = 0; i < b.length; i++) {
            b[i] = (byte) Integer.parseInt(s.substring(2 * i, 2 * i + 2), 16);
        }
        return b;
    }
}
