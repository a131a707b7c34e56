// Renders an Ollama TEMPLATE the way Ollama does: Go's text/template over .Messages (Role,
// Content). Usage: ollama_render TEMPLATE_FILE < {"Messages": [{"Role": ..., "Content": ...}]}
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Values struct {
	Messages []Message
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("TEMPLATE").Parse(string(text)))
	var v Values
	if err := json.NewDecoder(os.Stdin).Decode(&v); err != nil {
		panic(err)
	}
	if err := tmpl.Execute(os.Stdout, v); err != nil {
		panic(err)
	}
}
