package org.dijiang.demo

import android.app.Activity
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.TextView
import org.dijiang.demo.core.DemoConfig

/** Model and tokenizer paths, temperature and max tokens; checked by [DemoConfig.parse]. */
class SettingsActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_settings)
        padForSystemBars(findViewById(R.id.root))
        val store = SettingsStore(this)
        val current = store.load()
        val model = findViewById<EditText>(R.id.model_path).apply { setText(current.modelPath) }
        val tokenizer = findViewById<EditText>(R.id.tokenizer_path).apply { setText(current.tokenizerPath) }
        val temperature = findViewById<EditText>(R.id.temperature).apply { setText(current.temperature.toString()) }
        val maxTokens = findViewById<EditText>(R.id.max_tokens).apply { setText(current.maxNewTokens.toString()) }
        val errors = findViewById<TextView>(R.id.errors)
        findViewById<Button>(R.id.save).setOnClickListener {
            val parsed = DemoConfig.parse(
                model.text.toString(), tokenizer.text.toString(),
                temperature.text.toString(), maxTokens.text.toString()
            )
            when (parsed) {
                is DemoConfig.Parsed.Ok -> {
                    store.save(parsed.config)
                    finish()
                }
                is DemoConfig.Parsed.Invalid -> errors.text = parsed.errors.joinToString("\n")
            }
        }
    }
}
